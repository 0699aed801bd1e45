"""Small IEMOCAP and MSP-IMPROV trees in the corpora's real on-disk layouts, with real media.

The demo and the tests build corpora with these functions; the manifest readers, the
extractors and the trainer then run on them exactly as on a licensed copy. The media come
from :mod:`.media`: utterance wavs are 16 kHz mono int16; IEMOCAP dialog wavs are stereo
(channel 0 = the marker-wearing actor's microphone, channel 1 = the other actor); an IEMOCAP
dialog avi shows both actors side by side, an MSP-IMPROV clip its speaker full frame (or no
face, for clips listed as having none). With ``emotion_signal=False`` voice, words and face
motion are drawn independently of the label.

Each builder returns a dict describing what it wrote (ids, labels, expected counts, the
quirks placed and where), against which tests check the readers.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np

from cmarr.extract.base import LABELS

from .media import SR, make_transcript, synth_voice, write_clip_avi, write_dialog_avi, write_wav

RATER_WORDS = {"ang": "Anger", "hap": "Happiness", "exc": "Excited", "neu": "Neutral state",
               "sad": "Sadness", "fru": "Frustration", "sur": "Surprise", "fea": "Fear",
               "dis": "Disgust", "oth": "Other", "xxx": "Frustration"}
NON_4CLASS_CODES = ("xxx", "fru", "sur", "fea", "oth", "dis")
MSP_CODES = {"ang": "A", "hap": "H", "neu": "N", "sad": "S"}
MSP_WORDS = {"A": "Angry", "H": "Happy", "N": "Neutral", "S": "Sad", "O": "Other", "X": "Frustrated"}
# AppleDouble header of the macOS ``._*`` files, then bytes that are not valid UTF-8
_JUNK = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\xff\xfe\x80\x81" + bytes(range(256))


def _junk(path: Path) -> Path:
    """A macOS ``._<name>`` file beside ``path``."""
    j = path.parent / f"._{path.name}"
    j.parent.mkdir(parents=True, exist_ok=True)
    j.write_bytes(_JUNK)
    return j


def _balanced_labels(n: int, rng: np.random.Generator) -> list[str]:
    labels = [LABELS[i % 4] for i in range(n)]
    rng.shuffle(labels)
    return labels


# --------------------------------------------------------------------------------------
# IEMOCAP
# --------------------------------------------------------------------------------------

def _iemocap_dialog_names(k: int, n: int, quirks: bool) -> list[tuple[str, str]]:
    """``[(dialog, marker gender)]`` for session ``k``: impro, script, and (quirks) ``b``."""
    kinds = ("impro", "script", "scriptb") if quirks else ("impro", "script")
    out = []
    for j in range(n):
        marker = "F" if j % 2 == 0 else "M"
        num = j // len(kinds) + 1
        kind = kinds[j % len(kinds)]
        name = {"impro": f"impro{num:02d}", "script": f"script{num:02d}_1",
                "scriptb": f"script{num:02d}_1b"}[kind]
        out.append((f"Ses0{k}{marker}_{name}", marker))
    return out


def make_iemocap_tree(root: str | os.PathLike, sessions: tuple[int, ...] = (1, 2),
                      dialogs_per_session: int = 2, utts_per_dialog: int = 4, seed: int = 0,
                      emotion_signal: bool = True, video: bool = True, quirks: bool = True,
                      fps: float = 15.0, frame_size: tuple[int, int] = (240, 160),
                      duration_range: tuple[float, float] = (0.8, 1.6)) -> dict:
    """Write an IEMOCAP tree (``root/Session{k}/...``, the release's layout) and describe it.

    Each dialog holds ``utts_per_dialog`` 4-class utterances (labels balanced per session,
    speakers alternating F/M) and, with ``quirks``, two more with codes outside the 4-class
    set. With ``quirks=True`` every quirk of the real release is present: ``._*`` binary
    files beside label files, transcripts, wavs and avis; the rater subfolders
    ``Categorical/``, ``Attribute/``, ``Self-evaluation/`` with files; self-evaluation
    (``C-F1``/``C-M1``) and multi-label votes; an ``A-`` line without ``dom``; transcript
    lines that are not utterances (``XX`` ids, ``M:``/``F:`` lines); script and ``b`` dialog
    names; ``[LAUGHTER]`` markers; ``exc`` (for every other ``hap`` utterance) and codes
    ``xxx fru sur fea oth dis``; an utterance without ``.wdseg``. Dialog wavs are always
    stereo; ``video=False`` writes no avi.

    Returns ``{"root", "corpus", "sessions", "dialogs": {name: {...}}, "utterances": [...]
    (every labelled utterance), "ids" (the 4-class set, sorted), "labels": {id: label},
    "counts": {"per_label", "per_session", "total", "consensus"}, "quirks": {...}}``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    dialogs: dict[str, dict] = {}
    utterances: list[dict] = []
    q = {"junk_files": [], "rater_folders": [], "multi_label_ids": [], "missing_dom_ids": [],
         "self_evaluation_ids": [], "non_utterance_transcript_lines": 0, "script_dialogs": [],
         "b_dialogs": [], "laughter_ids": [], "exc_ids": [], "no_wdseg_ids": []}
    W, H = frame_size
    n_hap = 0
    for si, k in enumerate(sessions):
        names = _iemocap_dialog_names(k, dialogs_per_session, quirks)
        if quirks and si == 0 and not any(n.endswith("b") for n, _ in names):
            _, marker = names[-1]
            names[-1] = (f"Ses0{k}{marker}_script01_1b", marker)
        labels = _balanced_labels(dialogs_per_session * utts_per_dialog, rng)
        sdir = root / f"Session{k}"
        emo_dir = sdir / "dialog" / "EmoEvaluation"
        for di, (dialog, marker) in enumerate(names):
            codes = []
            for label in labels[di * utts_per_dialog:(di + 1) * utts_per_dialog]:
                code = label
                if quirks and label == "hap":
                    n_hap += 1
                    code = "exc" if n_hap % 2 == 1 else "hap"  # IEMOCAP's hap set is 64% exc
                codes.append(code)
            if quirks:
                extra = [NON_4CLASS_CODES[(2 * (si * dialogs_per_session + di) + j) % len(NON_4CLASS_CODES)]
                         for j in range(2)]
                codes.insert(1, extra[0])
                codes.append(extra[1])
            # --- the dialog's utterances: alternating speakers, sequential times
            t = round(float(rng.uniform(0.3, 1.0)), 4)
            turn_no = {"F": 0, "M": 0}
            dutts = []
            for ui, code in enumerate(codes):
                gender = "F" if ui % 2 == 0 else "M"
                uid = f"{dialog}_{gender}{turn_no[gender]:03d}"
                turn_no[gender] += 1
                dur = round(float(rng.uniform(*duration_range)), 4)
                label = "hap" if code == "exc" else (code if code in LABELS else None)
                voice_label = label if (label and emotion_signal) else LABELS[int(rng.integers(0, 4))]
                text = make_transcript(voice_label, rng, emotion_signal and label is not None)
                if quirks and voice_label == "hap" and not q["laughter_ids"]:
                    text += " [LAUGHTER]"
                    q["laughter_ids"].append(uid)
                u = {"utterance_id": uid, "dialog": dialog, "session": k, "speaker": f"Ses0{k}{gender}",
                     "gender": gender, "consensus": code, "label": label, "start": t,
                     "end": round(t + dur, 4), "transcript": text,
                     "wav_path": f"Session{k}/sentences/wav/{dialog}/{uid}.wav",
                     "video_half": "left" if gender == marker else "right",
                     "voice_label": voice_label, "audio": synth_voice(voice_label, dur, rng, gender)}
                if code == "exc":
                    q["exc_ids"].append(uid)
                dutts.append(u)
                t = round(t + dur + float(rng.uniform(0.15, 0.5)), 4)
            duration = t + 0.3
            if "script" in dialog:
                q["script_dialogs"].append(dialog)
            if dialog.endswith("b"):
                q["b_dialogs"].append(dialog)

            # --- EmoEvaluation/<dialog>.txt
            lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            for ui, u in enumerate(dutts):
                vad = rng.uniform(1.5, 4.5, 3)
                lines.append(f"[{u['start']:.4f} - {u['end']:.4f}]\t{u['utterance_id']}\t{u['consensus']}\t"
                             f"[{vad[0]:.4f}, {vad[1]:.4f}, {vad[2]:.4f}]")
                word = RATER_WORDS[u["consensus"]]
                for e in (1, 2, 3):
                    if quirks and ui == 0 and e == 1:
                        lines.append(f"C-E{e}:\tFrustration; {word};\t()")  # a multi-label vote
                        q["multi_label_ids"].append(u["utterance_id"])
                    else:
                        lines.append(f"C-E{e}:\t{word};\t()")
                lines.append(f"C-{u['gender']}1:\t{word};\t(self-report)")
                q["self_evaluation_ids"].append(u["utterance_id"])
                if quirks and ui == 1:
                    lines.append("A-E3:\tval 3; act 2;\t()")  # no dom value
                    q["missing_dom_ids"].append(u["utterance_id"])
                else:
                    lines.append("A-E3:\tval 3; act 2; dom  2;\t()")
                lines.append(f"A-{u['gender']}1:\tval 2; act 3; dom  3;\t()")
                lines.append("")
            emo_dir.mkdir(parents=True, exist_ok=True)
            (emo_dir / f"{dialog}.txt").write_text("\n".join(lines) + "\n")

            # --- per-rater files (not labels)
            if quirks:
                for folder, suffix, body in (
                        ("Categorical", "_e1_cat.txt", lambda u: f":{RATER_WORDS[u['consensus']]}; ()"),
                        ("Attribute", "_e3_atr.txt", lambda u: ":val 3; act 2; dom 2; ()"),
                        ("Self-evaluation", "_self_cat.txt", lambda u: f":{RATER_WORDS[u['consensus']]}; ()")):
                    p = emo_dir / folder / f"{dialog}{suffix}"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_text("\n".join(f"{u['utterance_id']} {body(u)}" for u in dutts) + "\n")
                    q["rater_folders"].append(str(p.relative_to(root)))
                q["junk_files"].append(str(_junk(emo_dir / f"{dialog}.txt").relative_to(root)))

            # --- transcriptions/<dialog>.txt
            tlines = []
            for ui, u in enumerate(dutts):
                tlines.append(f"{u['utterance_id']} [{u['start']:08.4f}-{u['end']:08.4f}]: {u['transcript']}")
                if quirks and ui == 0:
                    other = "M" if u["gender"] == "F" else "F"
                    tlines.append(f"{dialog}_{other}XX0 [{u['end']:08.4f}-{u['end'] + 0.1:08.4f}]: [BREATHING]")
                    tlines.append(f"{other}: [LAUGHTER] Oh.")
                    q["non_utterance_transcript_lines"] += 2
            tdir = sdir / "dialog" / "transcriptions"
            tdir.mkdir(parents=True, exist_ok=True)
            (tdir / f"{dialog}.txt").write_text("\n".join(tlines) + "\n")
            if quirks:
                q["junk_files"].append(str(_junk(tdir / f"{dialog}.txt").relative_to(root)))

            # --- audio: utterance wavs, stereo dialog wav, lab files, word alignments
            stereo = np.zeros((int(math.ceil(duration * SR)), 2), np.float32)  # (N, 2)
            for ui, u in enumerate(dutts):
                x = u.pop("audio")
                wav = root / u["wav_path"]
                write_wav(wav, x)
                ch = 0 if u["gender"] == marker else 1
                a = int(round(u["start"] * SR))
                stereo[a:a + len(x), ch] += x
                stereo[a:a + len(x), 1 - ch] += 0.08 * x  # cross-talk into the other microphone
                if quirks and ui == 0:
                    q["junk_files"].append(str(_junk(wav).relative_to(root)))
                if quirks and ui == 0 and di == 0 and si == 0:
                    q["no_wdseg_ids"].append(u["utterance_id"])
                else:
                    _write_wdseg(sdir / "sentences" / "ForcedAlignment" / dialog / f"{u['utterance_id']}.wdseg",
                                 u["transcript"], u["end"] - u["start"])
            write_wav(sdir / "dialog" / "wav" / f"{dialog}.wav", np.clip(stereo, -1, 1))
            for g in ("F", "M"):
                lab = sdir / "dialog" / "lab" / f"Ses0{k}_{g}" / f"{dialog}.lab"
                lab.parent.mkdir(parents=True, exist_ok=True)
                lab.write_text("".join(f"{u['start']:.4f} {u['end']:.4f} {u['utterance_id']}\n"
                                       for u in dutts if u["gender"] == g))
            avi = None
            if video:
                avi = sdir / "dialog" / "avi" / "DivX" / f"{dialog}.avi"
                write_dialog_avi(avi, duration, dutts, marker, fps, frame_size, emotion_signal)
                if quirks:
                    q["junk_files"].append(str(_junk(avi).relative_to(root)))
            dialogs[dialog] = {
                "session": k, "marker": marker, "duration": duration, "fps": fps, "frame_size": (W, H),
                "avi": str(avi.relative_to(root)) if avi else None,
                "wav": f"Session{k}/dialog/wav/{dialog}.wav",
                "left_face": "astronaut" if marker == "F" else "grace_hopper",
                "right_face": "grace_hopper" if marker == "F" else "astronaut",
            }
            utterances.extend(dutts)

    kept = [u for u in utterances if u["label"] is not None]
    return {
        "root": str(root), "corpus": "iemocap", "sessions": tuple(sessions), "dialogs": dialogs,
        "utterances": utterances,
        "ids": sorted(u["utterance_id"] for u in kept),
        "labels": {u["utterance_id"]: u["label"] for u in kept},
        "counts": {
            "per_label": dict(Counter(u["label"] for u in kept)),
            "per_session": dict(Counter(u["session"] for u in kept)),
            "total": len(kept),
            "consensus": dict(Counter(u["consensus"] for u in utterances)),
        },
        "quirks": q,
    }


def _write_wdseg(path: Path, text: str, duration: float) -> None:
    """Word alignment in the release's format: 10 ms frames ``SFrm EFrm SegAScr Word``."""
    words = [w for w in text.replace("[LAUGHTER]", "").split() if w]
    n = max(1, int(duration * 100))
    edges = np.linspace(0, n, len(words) + 1).astype(int)
    rows = ["    SFrm  EFrm    SegAScr Word"]
    rows += [f"{a:8d}{b - 1:6d}{-50000:11d} {w.strip('.!').upper()}" for a, b, w in zip(edges[:-1], edges[1:], words)]
    rows.append(f" Total Score: {-50000 * len(words)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


# --------------------------------------------------------------------------------------
# MSP-IMPROV
# --------------------------------------------------------------------------------------

def _msp_summary(uid: str, code: str, rng: np.random.Generator, nan: bool, no_n: bool) -> str:
    vals = [float(v) for v in rng.uniform(1, 5, 4)]
    fmt = (lambda v: "NaN") if nan else (lambda v: f"{v:.6f}")
    line = f"UTD-{uid[4:]}.avi; {code}; A:{fmt(vals[0])}; V:{fmt(vals[1])}; D:{fmt(vals[2])} ;"
    return line if no_n else line + f" N:{fmt(vals[3])};"


def make_msp_improv_tree(root: str | os.PathLike, sessions: tuple[int, ...] = (1, 2),
                         utts_per_session: int = 8, seed: int = 0, emotion_signal: bool = True,
                         video: bool = True, quirks: bool = True,
                         evaluation_name: str = "Evalution.txt", layout: str = "nested",
                         n_no_face: int = 2, fps: float = 15.0,
                         frame_size: tuple[int, int] = (160, 120), sample_rate: int = SR,
                         duration_range: tuple[float, float] = (0.8, 1.6)) -> dict:
    """Write an MSP-IMPROV tree and describe it.

    ``utts_per_session`` 4-class clips of recording type ``S`` per session (labels
    balanced, speakers ``F0k``/``M0k``). ``evaluation_name``: ``Evalution.txt`` (the
    release's spelling) or ``Evaluation.txt``. ``layout``: ``nested`` (the release's
    ``Audio/session{k}/S{nn}{E}/{T}/`` folders) or ``flat`` (all wavs in ``Audio/``, all avis
    in ``Video/``). With ``quirks=True``: clips of recording types P, R and T; ``S`` clips
    with consensus ``O`` and ``X``; ``NaN`` values and summary lines without ``N:``;
    multi-label rater lines; up to ``n_no_face`` clips taken from the shipped no-face list
    (their avi shows no face); a 4-class ``S`` clip with no media at all and one without its avi;
    ``._*`` junk files.

    Returns ``{"root", "corpus", "sessions", "clips": [...] (every labelled clip), "ids"
    (the paper's set: no-face clips dropped), "ids_keep_no_face", "labels", "no_face_ids",
    "counts": {"per_label", "per_session", "total"}, "dropped": {reason: count},
    "evaluation": file name, "quirks": {...}}``.
    """
    from cmarr.extract.corpora.manifest import load_msp_no_face

    if layout not in ("nested", "flat"):
        raise ValueError(f"layout must be 'nested' or 'flat', not {layout!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    no_face_list = load_msp_no_face()
    clips: list[dict] = []
    used: set[str] = set()
    q = {"types": Counter(), "nan_ids": [], "no_n_ids": [], "no_media_ids": [], "no_avi_ids": [],
         "junk_files": [], "non_4class_ids": [], "multi_label_ids": []}

    def new_id(k: int, gender: str, rtype: str, emo: str) -> str:
        while True:
            sent = int(rng.integers(1, 21))
            tag = ("FM" if gender == "F" else "MF") + f"{int(rng.integers(1, 40)):02d}"
            uid = f"MSP-IMPROV-S{sent:02d}{emo}-{gender}{k:02d}-{rtype}-{tag}"
            if uid not in used and uid not in no_face_list:
                used.add(uid)
                return uid

    for k in sessions:
        for ci, label in enumerate(_balanced_labels(utts_per_session, rng)):
            gender = "F" if ci % 2 == 0 else "M"
            emo = str(rng.choice(list(MSP_CODES.values())))
            clips.append({"utterance_id": new_id(k, gender, "S", emo), "session": k, "gender": gender,
                          "type": "S", "consensus": MSP_CODES[label], "label": label, "media": "all",
                          "face": True})
        if quirks:
            for rtype in ("P", "R", "T"):
                label = LABELS[int(rng.integers(0, 4))]
                clips.append({"utterance_id": new_id(k, "F", rtype, MSP_CODES[label]), "session": k,
                              "gender": "F", "type": rtype, "consensus": MSP_CODES[label], "label": label,
                              "media": "all", "face": True})
            for code in ("O", "X"):
                clips.append({"utterance_id": new_id(k, "M", "S", "N"), "session": k, "gender": "M",
                              "type": "S", "consensus": code, "label": None, "media": "all", "face": True})
    if quirks:
        # a 4-class clip with no media at all, and one without its video
        s_clips = [c for c in clips if c["type"] == "S" and c["label"]]
        s_clips[0]["media"] = "none"
        s_clips[1]["media"] = "no_avi"
        # clips of the shipped no-face list, from the sessions built
        inv = {v: k for k, v in MSP_CODES.items()}
        # (session 1 has a single listed clip: fewer than n_no_face may be available)
        picks = [u for u in sorted(no_face_list) if int(u.split("-")[3][1:]) in sessions][:n_no_face]
        for u in picks:
            k = int(u.split("-")[3][1:])
            clips.append({"utterance_id": u, "session": k, "gender": u.split("-")[3][0], "type": "S",
                          "consensus": no_face_list[u], "label": inv[no_face_list[u]], "media": "all",
                          "face": False})

    # --- Evalution.txt
    blocks = []
    for i, c in enumerate(clips):
        nan = quirks and i % 5 == 1
        no_n = quirks and i % 4 == 2
        lines = [_msp_summary(c["utterance_id"], c["consensus"], rng, nan, no_n)]
        multi = quirks and i % 3 == 0
        for r in range(3):
            word = MSP_WORDS[c["consensus"]] + ("; Frustrated" if multi and r == 0 else "")
            lines.append(f"rater-p{r + 1:03d}; {word}; A:3.000000; V:2.000000; D:3.000000; N:3.000000;")
        if multi:
            q["multi_label_ids"].append(c["utterance_id"])
        if nan:
            q["nan_ids"].append(c["utterance_id"])
        if no_n:
            q["no_n_ids"].append(c["utterance_id"])
        q["types"][c["type"]] += 1
        blocks.append("\n".join(lines))
    root.mkdir(parents=True, exist_ok=True)
    (root / evaluation_name).write_text("\n\n".join(blocks) + "\n")

    # --- media
    for c in clips:
        uid = c["utterance_id"]
        if c["media"] == "none":
            q["no_media_ids"].append(uid)
            continue
        parts = uid.split("-")  # MSP, IMPROV, S08A, F05, S, FM02
        sub = Path(f"session{c['session']}") / parts[2] / parts[4] if layout == "nested" else Path()
        label = c["label"] if (c["label"] and emotion_signal) else LABELS[int(rng.integers(0, 4))]
        dur = round(float(rng.uniform(*duration_range)), 3)
        wav = root / "Audio" / sub / f"{uid}.wav"
        write_wav(wav, synth_voice(label, dur, rng, c["gender"], sample_rate), sample_rate)
        c["wav_path"] = wav.relative_to(root).as_posix()
        c["duration"] = round(dur * sample_rate) / sample_rate
        text = make_transcript(label, rng, emotion_signal and c["label"] is not None)
        tpath = root / "All_human_transcriptions" / f"{uid}.txt"
        tpath.parent.mkdir(parents=True, exist_ok=True)
        tpath.write_text(text + "\n")
        c["transcript"] = text
        c["video_path"] = ""
        if video and c["media"] != "no_avi":
            avi = root / "Video" / sub / f"{uid}.avi"
            write_clip_avi(avi, dur, c["gender"] if c["face"] else None, label, fps, frame_size,
                           emotion_signal, rng)
            c["video_path"] = avi.relative_to(root).as_posix()
        if c["media"] == "no_avi":
            q["no_avi_ids"].append(uid)
    if quirks:
        first = next(c for c in clips if c.get("wav_path"))
        q["junk_files"].append(str(_junk(root / first["wav_path"]).relative_to(root)))
        q["junk_files"].append(str(_junk(root / evaluation_name).relative_to(root)))

    four = [c for c in clips if c["type"] == "S" and c["label"] and c["media"] != "none"]
    paper = [c for c in four if c["face"]]
    q["non_4class_ids"] = [c["utterance_id"] for c in clips if c["label"] is None]
    dropped = Counter()
    for c in clips:
        if c["type"] != "S":
            dropped["type"] += 1
        elif c["label"] is None:
            dropped["not_4class"] += 1
        elif not c["face"]:
            dropped["no_face"] += 1
        elif c["media"] == "none":
            dropped["no_media"] += 1
    return {
        "root": str(root), "corpus": "msp-improv", "sessions": tuple(sessions), "clips": clips,
        "ids": sorted(c["utterance_id"] for c in paper),
        "ids_keep_no_face": sorted(c["utterance_id"] for c in four),
        "labels": {c["utterance_id"]: c["label"] for c in four},
        "no_face_ids": sorted(c["utterance_id"] for c in clips if not c["face"]),
        "counts": {"per_label": dict(Counter(c["label"] for c in paper)),
                   "per_session": dict(Counter(c["session"] for c in paper)),
                   "total": len(paper)},
        "dropped": dict(dropped), "evaluation": evaluation_name, "layout": layout,
        "quirks": {**q, "types": dict(q["types"])},
    }

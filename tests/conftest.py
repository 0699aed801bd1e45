"""Shared fixtures. Environment variables the tests read:

- ``CMARR_TEST_THREADS``: when set, ``torch.set_num_threads(int(value))`` at the start of
  the session's tests (once collected, so it also overrides the count some modules (e.g.
  test_predict.py) set at import), e.g. to run the batching/process/thread comparisons
  (tolerances in ``tests/tolerance.py``) under another intra-op thread count. The
  ``one_thread`` fixture still sets one thread for its modules; subprocesses follow
  ``OMP_NUM_THREADS``.
- ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``: set to 1 unless given.
"""
import os

# A forgotten model-hub download must fail at once, not hang or pass by luck.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import h5py  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_finish(session):
    threads = os.environ.get("CMARR_TEST_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster than two contending with other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rewrite_table():
    """``rewrite_table(path, fn)`` replaces a store's utterance table by ``fn(table)``, as
    another tool or an old version might have written it."""
    from cmarr.extract.store import read_table, write_table

    def rewrite(path, fn):
        with h5py.File(path, "r+") as f:
            table = fn(read_table(f["utterances"]))
            del f["utterances"]
            write_table(f.create_group("utterances"), table)
    return rewrite


#: The small CM-ARR used by the end-to-end training tests (seconds per run on the CPU).
TINY_MODEL = {"d_model": 16, "seq_len": 8, "flow_hidden": 16, "flow_steps": 1, "umc_heads": 2, "fusion_heads": 2,
              "rcan_blocks": 1}


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(path, batch_size=8, epochs=2, **model)`` writes a cm-arr-train config of
    the small model (``model`` overrides its fields) and returns ``path``."""
    import yaml

    def write(path, batch_size=8, epochs=2, **model):
        doc = {"model": {**TINY_MODEL, **model},
               "optim": {"lr": 1.0e-3, "batch_size": batch_size, "epochs": epochs, "eval_batch_size": 64},
               "data": {"val_fraction": 0.2}}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path
    return write


#: Tiny random speech encoders of each architecture the speech extractor takes, as
#: ``tiny_speech_encoder(variant)`` saves them: ``variant -> (model_type, config overrides)``.
#: "-large" is the stable-layer-norm layout of wav2vec2-large-lv60 / hubert-large /
#: wavlm-large (LayerNorm after every conv, pre-norm blocks, a final LayerNorm);
#: "hubert-bn" has HuBERT's BatchNorm before the positional convolution.
TINY_SPEECH_ENCODERS = {
    "wav2vec2": ("wav2vec2", {"feat_extract_norm": "group", "do_stable_layer_norm": False}),
    "wav2vec2-large": ("wav2vec2", {"feat_extract_norm": "layer", "do_stable_layer_norm": True}),
    "hubert": ("hubert", {"feat_extract_norm": "group", "do_stable_layer_norm": False}),
    "hubert-large": ("hubert", {"feat_extract_norm": "layer", "do_stable_layer_norm": True}),
    "hubert-bn": ("hubert", {"feat_extract_norm": "group", "conv_pos_batch_norm": True}),
    "wavlm": ("wavlm", {"feat_extract_norm": "group", "do_stable_layer_norm": False,
                        "num_buckets": 32, "max_bucket_distance": 40}),
    "wavlm-large": ("wavlm", {"feat_extract_norm": "layer", "do_stable_layer_norm": True,
                              "num_buckets": 32, "max_bucket_distance": 40}),
    # three stacked positional convolutions of 5 taps (data2vec-audio-base: five of 19)
    "data2vec-audio": ("data2vec-audio", {"num_conv_pos_embeddings": 3, "conv_pos_kernel_size": 5}),
}


def save_tiny_speech_encoder(folder, model_type: str, seed: int = 0, **overrides):
    """A random ``model_type`` encoder with the real conv kernels/strides (400-sample
    receptive field, 320-sample hop), hidden 32, 2 blocks, FFN 64, 7 convs of 32 channels,
    a positional conv of 16 taps in 4 groups (unless ``overrides`` say otherwise), saved with
    ``save_pretrained`` beside a ``Wav2Vec2FeatureExtractor`` (per-utterance normalisation)
    like a hub checkpoint. Every norm of the feature encoder and positional embedding gets
    non-trivial parameters (statistics), so that a padding error cannot hide behind an
    identity norm."""
    from transformers import AutoConfig, AutoModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(seed)
    fields = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "conv_dim": (32,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **{**fields, **overrides}))
    with torch.no_grad():
        for m in [*model.feature_extractor.modules(), *model.encoder.pos_conv_embed.modules()]:
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm1d)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_speech_encoder(tmp_path_factory):
    """``tiny_speech_encoder(variant)``: the folder of the ``TINY_SPEECH_ENCODERS`` variant,
    saved once per session."""
    made = {}

    def get(variant: str):
        if variant not in made:
            model_type, overrides = TINY_SPEECH_ENCODERS[variant]
            made[variant] = save_tiny_speech_encoder(tmp_path_factory.mktemp("speech") / f"tiny-{variant}",
                                                     model_type, **overrides)
        return made[variant]
    return get

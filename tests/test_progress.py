"""Progress convention: a live bar on a terminal, a few summary lines into a file, nothing when off."""

import io

from jaxlab.progress import is_interactive, progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_file_gets_a_few_summary_lines_not_refreshes():
    out = io.StringIO()
    seen = list(progress(range(1000), desc="sky train", stream=out))
    assert seen == list(range(1000))
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 4  # 25 %, 50 %, 75 %, and the end
    assert lines[0].startswith("sky train: 250/1000 (25%)")
    assert lines[-1].startswith("sky train: 1000/1000 (100%)") and lines[-1].endswith("done")


def test_manual_updates_with_postfix_and_a_resumed_start():
    out = io.StringIO()
    bar = progress(total=8, initial=2, desc="rl sorted", stream=out)
    assert bar.mode == "lines"
    bar.update(2)
    bar.set_postfix(reward="0.500")
    bar.update(4)
    bar.close()
    bar.close()  # closing twice writes nothing more
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("rl sorted: 4/8 (50%)")
    assert lines[-1].startswith("rl sorted: 8/8 (100%)") and "reward=0.500" in lines[-1]
    assert len(lines) == 2


def test_unknown_total_writes_at_most_one_line_per_interval():
    out = io.StringIO()
    for _ in progress(iter(range(500)), desc="encode", stream=out, interval=3600):
        pass
    lines = out.getvalue().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("encode: 500 in") and "done" in lines[0]


def test_disabled_writes_nothing():
    out = io.StringIO()
    bar = progress(range(10), enabled=False, stream=out)
    assert bar.mode == "off" and list(bar) == list(range(10))
    assert out.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    term = _Terminal()
    assert is_interactive(term) and not is_interactive(io.StringIO())
    bar = progress(range(50), desc="bar", stream=term)
    assert bar.mode == "bar"
    list(bar)
    assert "\r" in term.getvalue() and "50/50" in term.getvalue()


def test_training_stages_follow_the_convention(capsys):
    """SMI's stages (what `sky train` shows): a few lines on stderr when it is not a terminal."""
    from jaxlab.sky.smi import _run_stage

    hist = _run_stage(400, lambda step: {"loss": 1.0 / (step + 1)}, "stage", True, print)
    err = capsys.readouterr().err
    assert "\r" not in err and 1 <= len(err.splitlines()) <= 5
    assert len(hist["loss"]) == 400


def test_encode_progress_follows_the_convention(capsys):
    from flax import nnx

    from jaxlab.models import BertConfig, BertEncoder
    from jaxlab.models.encode import encode_ids
    from jaxlab.tokenization import char_tokenizer

    tok = char_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok.hf),
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=32,
    )
    model = BertEncoder(cfg, rngs=nnx.Rngs(0))
    rows = [[5, 6, 7]] * 40
    encode_ids(model, tok, rows, batch_size=8, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("encode: 5/5 (100%)")

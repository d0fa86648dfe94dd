"""Windows (§3.1), QA examples (§3.2), contextualized windows and the schedule."""
import json
import math
import random

import pytest

from conftest import CHAT_TEMPLATE, build_tokenizer
from checkpoint import Tokenizer
from data import (IGNORE, RECITE, DataConfig, DataError, build_epochs, contextualized_example, ct_prefix,
                  qa_example, read_qa_jsonl, window_spans)


def check_windows(n, length, stride):
    spans = window_spans(n, length, stride)
    assert spans[0][0] == 0 and spans[-1][1] == n                       # first at 0, last ends at L
    covered = set()
    for a, b in spans:
        covered.update(range(a, b))
    assert covered == set(range(n))                                     # every token covered
    if n <= length:
        assert spans == [(0, n)]                                        # short input: one window
        return
    assert all(b - a == length for a, b in spans)                       # every window is ℓ long
    starts = [a for a, _ in spans]
    assert all(y - x == stride for x, y in zip(starts[:-2], starts[1:-1]))  # stride s between starts...
    assert 0 < starts[-1] - starts[-2] <= stride                        # ...the last one shifted back
    assert len(spans) == 1 + math.ceil((n - length) / stride)           # the count formula


def test_windows_on_hand_picked_cases():
    assert window_spans(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert window_spans(11, 4, 3) == [(0, 4), (3, 7), (6, 10), (7, 11)]
    assert window_spans(3, 8, 3) == [(0, 3)]
    assert window_spans(8, 8, 3) == [(0, 8)]
    assert window_spans(2048 + 768 * 3, 2048, 768) == [(i * 768, i * 768 + 2048) for i in range(4)]


def test_windows_invariants_on_random_settings():
    rng = random.Random(0)
    for _ in range(2000):
        length = rng.randint(1, 300)
        stride = rng.randint(1, length)
        check_windows(rng.randint(1, 2000), length, stride)


@pytest.mark.parametrize("n,length,stride,msg", [(0, 4, 2, "empty"), (10, 0, 1, "positive"),
                                                  (10, 4, 0, "positive"), (10, 4, 5, "larger than the window")])
def test_invalid_window_settings_raise(n, length, stride, msg):
    with pytest.raises(DataError, match=msg):
        window_spans(n, length, stride)


def test_default_stride_is_three_eighths_of_the_window():
    assert DataConfig(window=2048).step == 768
    assert DataConfig(window=512, stride=100).step == 100


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    return Tokenizer(t, CHAT_TEMPLATE, "", "<|im_end|>", [2])


def test_qa_example_puts_loss_on_exactly_the_answer_and_end_token(tok):
    ex = qa_example(tok, "Who lent the money?", "Aurelio Fenwick", "some document text")
    answer_ids = tok.encode("Aurelio Fenwick")
    labelled = [t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE]
    assert labelled == answer_ids + [2]
    assert ex.labels[: len(ex.labels) - len(labelled)] == [IGNORE] * (len(ex.labels) - len(labelled))
    prompt = tok.decode(ex.input_ids[: len(ex.input_ids) - len(labelled)], skip_special=False)
    assert "some document text" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_contextualized_window_has_loss_on_the_window_only(tok):
    doc = tok.encode("The quick brown fox jumps over the lazy dog. " * 30)
    cfg = DataConfig(window=32, context=40, contextualized=True)
    prefix = ct_prefix(doc, cfg, tok, random.Random(0))
    ex = contextualized_example(doc, (50, 82), prefix)
    assert ex.input_ids[-32:] == doc[50:82] and ex.labels[-32:] == doc[50:82]
    assert set(ex.labels[:-32]) == {IGNORE} and len(ex.input_ids) > 32 + 20
    # the prefix holds ct_prefix (= context/2) document tokens plus the instruction, whatever the split
    assert len(prefix) <= cfg.ct_prefix + len(tok.encode("\n...\n" + RECITE)) + 4


def test_schedule_is_windows_first_then_windows_plus_qa_and_seeded(tok):
    doc = tok.encode("The quick brown fox jumps over the lazy dog. " * 30)
    cfg = DataConfig(window=64, context=40, qa_start_epoch=2)
    qa = [{"question": "What jumps?", "answer": "the fox"}]
    plan = build_epochs(doc, qa, 4, cfg, tok, seed=1)
    n_windows = len(window_spans(len(doc), 64, cfg.step))
    assert [len(e) for e in plan] == [n_windows, n_windows, n_windows + 1, n_windows + 1]
    assert [sum(x.kind == "qa" for x in e) for e in plan] == [0, 0, 1, 1]
    again = build_epochs(doc, qa, 4, cfg, tok, seed=1)
    assert [[x.input_ids for x in e] for e in plan] == [[x.input_ids for x in e] for e in again]
    other = build_epochs(doc, qa, 4, cfg, tok, seed=2)
    assert [[x.input_ids for x in e] for e in plan] != [[x.input_ids for x in e] for e in other]


def test_qa_file_errors_name_the_line(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "a?", "answer": "b"}) + "\n\n" + "{not json\n")
    with pytest.raises(DataError, match="line 3"):
        read_qa_jsonl(str(f))
    f.write_text(json.dumps({"question": "a?"}) + "\n")
    with pytest.raises(DataError, match="line 1.*answer"):
        read_qa_jsonl(str(f))
    f.write_text(json.dumps({"question": "a?", "answer": "b"}) + "\n")
    assert read_qa_jsonl(str(f)) == [{"question": "a?", "answer": "b"}]

"""Nothing silently wrong: every bad input a user can give is either handled correctly or refused
with one line and exit status 2, before any training where it can be known before; and nothing
that was trained is thrown away by a problem found after training. In-process (train.cli,
eval.main) so the whole table runs in seconds; the subprocess path is covered in test_lift.py."""
import json

import pytest
import torch

import cache
import eval as ev
import gated_memory as gm
import train
from conftest import TEXT
from checkpoint import load_model

BASE = ["--ask", "What came?", "--window", "32", "--context", "48", "--epochs", "1", "--dtype", "float32",
        "--max-new-tokens", "3", "--quiet"]


def run_cli(capsys, *args):
    code = train.cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text(TEXT * 2)
    return p


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return str(p)


CASES = [   # (what, document text or None for the default, extra flags, message, trains before failing?)
    ("negative context", None, ["--context", "-5"], "cannot be negative"),
    ("window of one token", None, ["--window", "1"], "at least 2 tokens"),
    ("one-token document", "a", [], "fewer than 2 tokens"),
    ("document of NUL bytes", b"\x00\x00\x00", [], "empty"),
    ("binary document", b"text\x00more text", [], "nul bytes"),
    ("cuda without cuda", None, ["--device", "cuda"], "no cuda device"),
    ("negative learning rate", None, ["--lr", "-1"], "learning rate"),
    ("infinite learning rate", None, ["--lr", "inf"], "learning rate"),
    ("zero answer tokens", None, ["--max-new-tokens", "0"], "max-new-tokens"),
    ("QA pairs never reached", None, ["--qa", "QA", "--epochs", "2"], "never be trained"),
    ("CT prefix + window too long", None, ["--contextualized", "--context", "200", "--window", "400"], "do not fit"),
    ("question too long", None, ["--ask", "why " * 600], "do not fit"),
    ("epochs 0", None, ["--epochs", "0"], "at least one epoch"),
    ("route without a study", None, ["--route"], "--route asks"),
]


@pytest.mark.parametrize("what,text,extra,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_training(tiny_dir, tmp_path, capsys, what, text, extra, message):
    d = write(tmp_path, "d.txt", text if text is not None else TEXT * 2)
    extra = [write(tmp_path, "qa.jsonl", json.dumps({"question": "q?", "answer": "a"}) + "\n") if x == "QA" else x
             for x in extra]
    code, out, err = run_cli(capsys, "--doc", d, "--model", str(tiny_dir), *BASE, *extra)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0].lower(), err
    assert "tokens/s" not in err                                   # refused before any training
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_diverging_training_is_refused_and_nothing_is_cached(tiny_dir, doc, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--doc", str(doc), "--model", str(tiny_dir), *BASE, "--lr", "1e9",
                           "--epochs", "3")
    assert code == 2 and ("loss became" in err or "diverged" in err), err
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_adapter_file_of_another_document_or_settings_is_refused(tiny_dir, doc, tmp_path, capsys):
    adapter = str(tmp_path / "a.safetensors")
    assert run_cli(capsys, "--doc", str(doc), "--model", str(tiny_dir), *BASE, "--adapter", adapter)[0] == 0
    other = write(tmp_path, "other.txt", "A completely different document about rivers and stones. " * 20)
    code, _, err = run_cli(capsys, "--doc", other, "--model", str(tiny_dir), *BASE, "--adapter", adapter)
    assert code == 2 and "another document" in err
    code, _, err = run_cli(capsys, "--doc", str(doc), "--model", str(tiny_dir), *BASE, "--adapter", adapter,
                           "--lr", "0.002")
    assert code == 2 and "other settings" in err
    code, _, err = run_cli(capsys, "--doc", str(doc), "--model", str(tiny_dir), *BASE, "--adapter", adapter)
    assert code == 0 and "no training" in err


def test_cache_that_is_a_file_is_refused_before_training(tiny_dir, doc, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIFT_CACHE", write(tmp_path, "not-a-folder", "x"))
    code, _, err = run_cli(capsys, "--doc", str(doc), "--model", str(tiny_dir), *BASE)
    assert code == 2 and "not writable" in err and "tokens/s" not in err


def test_empty_cache_variable_means_the_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LIFT_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / ".cache" / "lift"


def test_failed_save_after_training_still_answers(tiny_dir, doc, capsys, monkeypatch):
    def fail(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gm, "save", fail)
    code, out, err = run_cli(capsys, "--doc", str(doc), "--model", str(tiny_dir), *BASE)
    assert code == 0 and "\nA: " in out and "could not save" in err and "No space left" in err


@pytest.mark.parametrize("damage", ["truncate", "zero bytes", "garbage", "flip a tensor byte"])
def test_corrupt_cache_entry_is_detected_and_retrained(tiny_dir, doc, tmp_path, capsys, damage):
    args = ["--doc", str(doc), "--model", str(tiny_dir), *BASE]
    first = run_cli(capsys, *args)
    entry = next((tmp_path / "cache").glob("*.safetensors"))
    data = entry.read_bytes()
    entry.write_bytes({"truncate": data[:len(data) // 2], "zero bytes": b"", "garbage": b"not safetensors" * 10,
                       "flip a tensor byte": data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:]}[damage])
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "unusable" in err and "tokens/s" in err          # said so, and trained again
    assert out == first[1]                                               # same seed: the same answer
    assert run_cli(capsys, *args)[2].count("no training") == 1            # and the new entry is good


def test_stale_temporary_files_are_removed(tmp_path):
    import os
    old, fresh = tmp_path / ".adapter-old.tmp", tmp_path / ".adapter-new.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (0, 0))
    cache.remove_stale_temporaries(tmp_path)
    assert not old.exists() and fresh.exists()


def test_malformed_config_json_is_one_line(tiny_dir, doc, capsys):
    (tiny_dir / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "--doc", str(doc), "--model", str(tiny_dir), *BASE)
    assert code == 2 and "not valid json" in err.lower()


def test_rope_parameters_of_transformers_5_are_read(tiny_dir):
    from model import ConfigError
    cfg = json.loads((tiny_dir / "config.json").read_text())
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    old_style = {**cfg, "rope_theta": 5e5, "rope_scaling": rs}
    cfg.pop("rope_theta")
    new_style = {**cfg, "rope_parameters": {"rope_theta": 5e5, **rs}}
    logits = []
    for c in (old_style, new_style):
        (tiny_dir / "config.json").write_text(json.dumps(c))
        model, _ = load_model(str(tiny_dir))
        assert model.cfg.rope_theta == 5e5 and model.cfg.rope_scaling["rope_type"] == "llama3"
        with torch.no_grad():
            logits.append(model(torch.tensor([list(range(3, 90))])))
    assert torch.equal(logits[0], logits[1])
    (tiny_dir / "config.json").write_text(json.dumps({**old_style, "partial_rotary_factor": 0.5}))
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        load_model(str(tiny_dir))


def test_gguf_without_llama_metadata_is_one_line(tmp_path):
    import gguf
    from model import ConfigError
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="lacks the llama metadata"):
        load_model(str(tmp_path / "m.gguf"))


def test_sft_with_zero_documents_per_step_is_one_line_before_the_model_loads(capsys, tmp_path, monkeypatch):
    import checkpoint

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")
    monkeypatch.setattr(checkpoint, "load_model", no_load)
    code, _, err = run_cli(capsys, "sft", "--out", str(tmp_path / "s"), "--docs-per-step", "0")
    assert code == 2 and "at least 1" in err


# ----------------------------------------------------------------------------- eval.py
def bench_line(**over):
    rec = {"id": "a", "document": TEXT, "questions": [{"question": "What came?", "answers": ["frost"],
                                                       "evidence_pos": 0.5}]}
    rec.update(over)
    return json.dumps(rec) + "\n"


EVAL_CASES = [
    ("string answers", bench_line(questions=[{"question": "q?", "answers": "frost"}]), "line 1", "answers"),
    ("string evidence_pos", bench_line(questions=[{"question": "q?", "answers": ["x"], "evidence_pos": "0.5"}]),
     "line 1", "evidence_pos"),
    ("empty question", bench_line(questions=[{"question": " ", "answers": ["x"]}]), "line 1", "question"),
    ("duplicate ids", bench_line() + bench_line(), "line 2", "used twice"),
    ("not json", bench_line() + "{oops\n", "line 2", "not valid json"),
    ("invalid utf-8", b"\xff\xfe{}", "", "utf-8"),
    ("missing file", None, "", "no such file"),
]


@pytest.mark.parametrize("what,content,where,message", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_benchmark_file_is_one_line_before_training(tiny_dir, tmp_path, capsys, what, content, where, message):
    bench = tmp_path / "b.jsonl"
    if content is not None:
        bench.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = ev.main(["run", "--bench", str(bench), "--model", str(tiny_dir), "--out", str(tmp_path / "r"),
                    "--window", "32", "--context", "48", "--epochs", "1", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 2 and where in err and message in err.lower(), err
    assert not (tmp_path / "r" / "records.jsonl").exists()


def test_eval_refuses_an_output_folder_made_with_other_settings(tiny_dir, tmp_path, capsys):
    bench = tmp_path / "b.jsonl"
    bench.write_text(bench_line())
    args = ["run", "--bench", str(bench), "--model", str(tiny_dir), "--out", str(tmp_path / "r"), "--modes", "icl",
            "--window", "32", "--context", "48", "--epochs", "1", "--dtype", "float32", "--max-new-tokens", "2"]
    assert ev.main(args) == 0
    assert ev.main(args[:-1] + ["3"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert ev.main(args + ["--epochs", "0"]) == 2


def test_show_study_prints_the_study_set_without_a_model(capsys, doc, monkeypatch):
    monkeypatch.setattr(train, "main", lambda **k: pytest.fail("--show-study must not load a model or train"))
    code, out, _ = run_cli(capsys, "--doc", str(doc), "--show-study", "--distill", "4", "--phrasings", "2")
    assert code == 0 and out.count("Q: ") == out.count("A: ") > 0
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"{out.count('Q: ')} questions,") and "distinct replies" in last
    code, _, err = run_cli(capsys, "--doc", str(doc), "--show-study")            # no study set to show
    assert code == 2 and err.count("\n") == 1 and "--distill" in err

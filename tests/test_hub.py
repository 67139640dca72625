"""Tests for diffusers_aria.hub: model card, upload file selection and push_to_hub (never reaching the network)."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest

from diffusers_aria import hub

TOKEN = "hf_" + "abcdefghijklmnopqrstuvwxyzABCD"  # 30 letters
OTHER_TOKEN = "hf_" + "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxw"


def _png_bytes() -> bytes:
    """A valid 1x1 RGB PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
            + chunk(b"IEND", b""))


def _report(n: int) -> dict:
    regions = [
        {"region": k, "name": f"topic {k}", "size": 10 + k, "prior": 1.0 / n, "probability": 1.0 / n,
         "estimate": 0.5 + k / n, "uncertainty": None, "effective_count": 3.0, "draw_share": 1.0 / n}
        for k in range(n)
    ]
    return {"policy": "aria", "step": 200, "metrics": {"aria/entropy": 1.0}, "regions": regions}


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


@pytest.fixture
def out(tmp_path, monkeypatch) -> str:
    """A fake final training output folder; the stored-token lookup is disabled."""
    monkeypatch.setattr(hub, "get_token", lambda: None)
    d = str(tmp_path / "student")
    _write(os.path.join(d, "model_index.json"), json.dumps({"_class_name": "StableDiffusionPipeline"}))
    _write(os.path.join(d, "unet", "config.json"), json.dumps({"sample_size": 64}))
    _write(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    _write(os.path.join(d, "tokenizer", "special_tokens_map.json"), "{}")
    _write(os.path.join(d, "checkpoint-2", "optimizer.bin"), b"\x00opt")
    _write(os.path.join(d, "checkpoint-2", "aria_state.json"), "{}")
    _write(os.path.join(d, "logs", "events.out"), b"\x00events")
    _write(os.path.join(d, "aria_report.json"), json.dumps(_report(3)))
    _write(os.path.join(d, "aria_allocation.png"), _png_bytes())
    _write(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors.tmp-123"), b"half")
    return d


def _card(out: str, **kw) -> str:
    args = dict(base_model="runwayml/stable-diffusion-v1-5", repo_id="me/aria-bk-small", architecture="bk_small",
                student_mode="full", aria_settings={"policy": "aria", "num_regions": 3, "temperature": 1.0})
    args.update(kw)
    path = hub.write_model_card(out, **args)
    assert path == os.path.join(out, "README.md")
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def test_card_front_matter_tables_and_images(out, tmp_path):
    grid = tmp_path / "elsewhere" / "validation grid.png"
    _write(str(grid), _png_bytes())
    with open(os.path.join(out, "aria_report.json")) as fh:
        report = json.load(fh)
    text = _card(out, aria_report=report, allocation_plot=os.path.join(out, "aria_allocation.png"),
                 validation_image=str(grid), train_settings={"learning_rate": 1e-4, "max_train_steps": 200},
                 license="creativeml-openrail-m")
    yaml = pytest.importorskip("yaml")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "creativeml-openrail-m"
    assert meta["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image"
    assert meta["inference"] is True
    assert meta["tags"] == ["stable-diffusion", "text-to-image", "diffusers", "distillation", "aria", "bk-sdm"]
    assert "arXiv:2606.23898" in text and "Random Conditioning" in text
    assert 'StableDiffusionPipeline.from_pretrained("me/aria-bk-small"' in text
    assert "load_lora_weights" not in text
    assert "| region | name | size | prior | probability | estimate | draw_share |" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "topic" in ln]
    assert [r.split("|")[2].strip() for r in rows] == ["topic 2", "topic 1", "topic 0"]  # estimate descending
    assert "| 2 | topic 2 | 12 | 0.3333 | 0.3333 | 1.167 | 0.3333 |" in text
    assert "![ARIA allocation plot](aria_allocation.png)" in text
    assert "![validation images](images/validation%20grid.png)" in text
    assert os.path.isfile(os.path.join(out, "images", "validation grid.png"))  # copied in
    assert "| `learning_rate` | 0.0001 |" in text
    assert not [f for f in os.listdir(out) if ".tmp" in f and "README" in f]  # no temp file left behind


def test_card_never_contains_a_token(out):
    train = {"hub_token": TOKEN, "HF_API_KEY": "x", "db_password": "p", "client_secret": "s",
             "report_to": f"wandb --token {OTHER_TOKEN}", "nested": {"push_token": TOKEN, "note": OTHER_TOKEN},
             "learning_rate": 1e-4}
    text = _card(out, train_settings=train, teacher_report={"note": f"loaded with {TOKEN}"},
                 aria_settings={"policy": "aria", "tag": OTHER_TOKEN})
    assert TOKEN not in text and OTHER_TOKEN not in text
    assert "hf_" not in text
    for key in ("hub_token", "HF_API_KEY", "db_password", "client_secret", "push_token"):
        assert key not in text
    assert "wandb --token ***" in text
    assert "learning_rate" in text


def test_card_lora_usage_caps_regions_and_validates(out):
    text = _card(out, student_mode="lora", aria_report=_report(70), repo_id=None)
    assert "pipe.load_lora_weights(" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "topic" in ln]
    assert len(rows) == 64
    assert "| 69 | topic 69 |" in rows[0]
    assert "6 of 70 regions were left out" in text
    with pytest.raises(ValueError, match="student_mode.*'full', 'lora'.*'half'"):
        _card(out, student_mode="half")
    with pytest.raises(FileNotFoundError, match="validation_image 'missing.png'"):
        _card(out, validation_image="missing.png")


def test_files_to_upload_excludes_training_state(out):
    _card(out)
    files = hub.files_to_upload(out)
    for kept in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "README.md",
                 "aria_report.json", "aria_allocation.png", "tokenizer/special_tokens_map.json"):
        assert kept in files
    assert not [f for f in files if f.startswith(("checkpoint-", "logs")) or ".tmp" in f]
    assert "unet/config.json" not in hub.files_to_upload(out, extra_ignore_patterns=["unet/config.json"])
    with pytest.raises(TypeError, match="extra_ignore_patterns"):
        hub.files_to_upload(out, extra_ignore_patterns="logs")


def _patch_hub(monkeypatch) -> list[tuple[str, tuple, dict]]:
    calls: list[tuple[str, tuple, dict]] = []
    monkeypatch.setattr(hub, "create_repo", lambda *a, **k: calls.append(("create_repo", a, k)) or "repo-url")

    def fake_upload(**kw):
        calls.append(("upload_folder", (), kw))
        return "https://huggingface.co/me/aria/commit/abc123"

    monkeypatch.setattr(hub, "upload_folder", fake_upload)
    return calls


def test_push_to_hub_calls_hub_with_right_arguments(out, monkeypatch):
    _card(out)
    calls = _patch_hub(monkeypatch)
    ref = hub.push_to_hub(out, "me/aria", token=TOKEN, private=True, extra_ignore_patterns=["samples/**"])
    assert ref == "https://huggingface.co/me/aria/commit/abc123"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    _, args, kw = calls[0]
    assert args == ("me/aria",) and kw == {"token": TOKEN, "private": True, "exist_ok": True}
    kw = calls[1][2]
    assert kw["repo_id"] == "me/aria" and kw["folder_path"] == out and kw["token"] == TOKEN
    assert kw["ignore_patterns"] == hub.UPLOAD_IGNORE_PATTERNS + ["samples/**"]
    assert kw["commit_message"] == "Upload ARIA-distilled student"


def test_push_to_hub_requires_finished_model(out, monkeypatch):
    calls = _patch_hub(monkeypatch)
    os.remove(os.path.join(out, "model_index.json"))
    with pytest.raises(FileNotFoundError, match="model_index.json.*[Ff]inish training"):
        hub.push_to_hub(out, "me/aria", token=TOKEN)
    with pytest.raises(FileNotFoundError, match="finish training"):
        hub.push_to_hub(os.path.join(out, "nope"), "me/aria")
    with pytest.raises(ValueError, match="repo_id 'a/b/c'"):
        _write(os.path.join(out, "model_index.json"), "{}")
        hub.push_to_hub(out, "a/b/c")
    assert calls == []


def test_push_to_hub_refuses_files_with_the_token(out, monkeypatch):
    calls = _patch_hub(monkeypatch)
    _write(os.path.join(out, "unet", "notes.txt"), f"trained with --hub_token {TOKEN}\n")
    with pytest.raises(ValueError, match=r"'unet/notes.txt'.*the Hub token") as err:
        hub.push_to_hub(out, "me/aria", token=TOKEN)
    assert TOKEN not in str(err.value)
    assert calls == []
    # the same file is fine once it is excluded; a token only inside ignored training state is never uploaded
    _write(os.path.join(out, "checkpoint-2", "args.json"), json.dumps({"hub_token": TOKEN}))
    hub.push_to_hub(out, "me/aria", token=TOKEN, extra_ignore_patterns=["unet/notes.txt"])
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]


def test_push_to_hub_checks_the_stored_token_when_none_is_given(out, monkeypatch):
    calls = _patch_hub(monkeypatch)
    stored = "hf_storedtoken"  # short on purpose: only the exact-match check can find it
    monkeypatch.setattr(hub, "get_token", lambda: stored)
    _write(os.path.join(out, "config.yaml"), f"token: {stored}\n")
    with pytest.raises(ValueError, match="'config.yaml'"):
        hub.push_to_hub(out, "me/aria")
    assert calls == []

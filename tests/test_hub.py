"""Tests for diffusers_aria.hub: model card, upload file selection and push_to_hub (never reaching the network)."""

from __future__ import annotations

import json
import os
import socket
import struct
import zlib

import huggingface_hub
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
                student_mode="full", aria_settings={"policy": "aria", "num_regions": 3, "temperature": 1.0},
                license="creativeml-openrail-m")
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


# ----------------------------------------------------------------------------------------------- license
def _meta(text: str) -> dict:
    yaml = pytest.importorskip("yaml")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _teacher(tmp_path, name: str = "tiny-teacher", card: str | None = None, model_index: dict | None = None,
             report: dict | None = None) -> str:
    """A local teacher folder (model_index.json, optionally README.md and aria_teacher_report.json)."""
    d = str(tmp_path / "teachers" / name)
    _write(os.path.join(d, "model_index.json"),
           json.dumps(model_index if model_index is not None else {"_class_name": "StableDiffusionPipeline"}))
    if card is not None:
        _write(os.path.join(d, "README.md"), card)
    if report is not None:
        _write(os.path.join(d, "aria_teacher_report.json"), json.dumps(report))
    return d


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hub cache; every network connection fails and every hf_hub_download call is recorded."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    calls: list[dict] = []
    real = hub.hf_hub_download

    def recording(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(hub, "hf_hub_download", recording)

    def add_card(repo_id: str, card: str) -> None:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        _write(str(repo / "refs" / "main"), commit)
        _write(str(repo / "snapshots" / commit / "README.md"), card)

    add_card.calls = calls
    return add_card


def test_teacher_license_local_folder_and_cached_hub_card(tmp_path, hub_cache):
    sd_card = "---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n# SD\n"
    assert hub.teacher_license(_teacher(tmp_path, "a", card=sd_card)) == "creativeml-openrail-m"
    assert hub.teacher_license(_teacher(tmp_path, "b")) is None  # no README.md
    assert hub.teacher_license(_teacher(tmp_path, "c", card="# no front matter\n")) is None
    assert hub.teacher_license(_teacher(tmp_path, "d", card="---\ntags: [x]\n---\n")) is None
    assert hub.teacher_license(_teacher(tmp_path, "e", card="---\nlicense: [unclosed\n---\n")) is None
    assert hub.teacher_license(str(tmp_path / "missing" / "teacher")) is None

    # a Hub id: only the locally cached card is read, never the network
    hub_cache("me/sd-teacher", sd_card)
    assert hub.teacher_license("me/sd-teacher") == "creativeml-openrail-m"
    assert hub.teacher_license("me/not-cached") is None
    assert hub_cache.calls and all(k.get("local_files_only") is True for k in hub_cache.calls)
    # a local folder without a license falls back to the cached card of the Hub id it records
    copy = _teacher(tmp_path, "f", model_index={"_class_name": "StableDiffusionPipeline",
                                                "_name_or_path": "me/sd-teacher"})
    assert hub.teacher_license(copy) == "creativeml-openrail-m"


def test_resolve_license_explicit_then_teacher_then_error(tmp_path, hub_cache):
    with_card = _teacher(tmp_path, "with-card", card="---\nlicense: mit\n---\n")
    assert hub.resolve_license(with_card, "apache-2.0") == "apache-2.0"  # explicit wins
    assert hub.resolve_license(with_card, None) == "mit"
    bare = _teacher(tmp_path, "bare")
    for teacher in (bare, "me/not-cached"):
        with pytest.raises(ValueError, match="--license") as err:
            hub.resolve_license(teacher, None)
        msg = str(err.value)
        assert teacher in msg and "creativeml-openrail-m" in msg and "apache-2.0" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="license"):
        hub.resolve_license(bare, "")


def test_card_license_comes_from_the_teacher(out, tmp_path, hub_cache):
    teacher = _teacher(tmp_path, card="---\nlicense: creativeml-openrail-m\n---\n")
    assert _meta(_card(out, base_model=teacher, license=None))["license"] == "creativeml-openrail-m"
    assert _meta(_card(out, base_model=teacher, license="apache-2.0"))["license"] == "apache-2.0"
    hub_cache("me/sd-teacher", "---\nlicense: openrail\n---\n")
    assert _meta(_card(out, base_model="me/sd-teacher", license=None))["license"] == "openrail"
    # a local teacher without a card: the license of the cached card of base_model_id
    bare = _teacher(tmp_path, "bare")
    assert _meta(_card(out, base_model=bare, base_model_id="me/sd-teacher", license=None))["license"] == "openrail"
    os.remove(os.path.join(out, "README.md"))
    with pytest.raises(ValueError, match=f"teacher '{bare}'.*--license"):
        _card(out, base_model=bare, license=None)
    assert not os.path.exists(os.path.join(out, "README.md"))


# ----------------------------------------------------------------------------------------------- base_model
def test_card_base_model_is_never_a_local_path(out, tmp_path, monkeypatch):
    # a local folder with no recorded Hub id: no base_model, only the folder's name in the card
    teacher = _teacher(tmp_path)
    text = _card(out, base_model=teacher)
    assert "base_model" not in _meta(text)
    assert str(tmp_path) not in text and "teachers/" not in text
    assert "The teacher was a local model (`tiny-teacher`)" in text
    assert "teacher `tiny-teacher` (a local model)" in text
    # the same folder given relatively, and paths that do not exist
    monkeypatch.chdir(tmp_path)
    for path in ("./teachers/tiny-teacher", "teachers/tiny-teacher", "/opt/models/sd-v1-5", "~/models/sd",
                 "models/sd/v1-5"):
        text = _card(out, base_model=path)
        assert "base_model" not in _meta(text), path
        assert "The teacher was a local model" in text and path not in text
    # the Hub id the folder was made from: model_index.json _name_or_path, else aria_teacher_report.json hub_id
    named = _teacher(tmp_path, "from-index", model_index={"_name_or_path": "runwayml/stable-diffusion-v1-5"})
    assert _meta(_card(out, base_model=named))["base_model"] == "runwayml/stable-diffusion-v1-5"
    reported = _teacher(tmp_path, "from-report", report={"hub_id": "me/tiny-teacher", "path": str(tmp_path)})
    text = _card(out, base_model=reported)
    assert _meta(text)["base_model"] == "me/tiny-teacher" and str(tmp_path) not in text
    assert "[`me/tiny-teacher`](https://huggingface.co/me/tiny-teacher)" in text
    pathy = _teacher(tmp_path, "pathy", model_index={"_name_or_path": str(tmp_path / "elsewhere")},
                     report={"hub_id": "../up"})
    assert "base_model" not in _meta(_card(out, base_model=pathy))
    # an explicit base_model_id wins; it must be a Hub id
    assert _meta(_card(out, base_model=teacher, base_model_id="me/base"))["base_model"] == "me/base"
    with pytest.raises(ValueError, match="base_model_id.*'/abs/teacher'"):
        _card(out, base_model=teacher, base_model_id="/abs/teacher")
    # a Hub id is kept as it is
    assert _meta(_card(out))["base_model"] == "runwayml/stable-diffusion-v1-5"


# ----------------------------------------------------------------------------------------------- usage snippet
def _snippet(text: str) -> str:
    return text.split("## How to use")[1].split("```python")[1].split("```")[0]


def test_card_usage_snippet_follows_dtype_and_device(out, tmp_path):
    code = _snippet(_card(out))
    assert 'from_pretrained("me/aria-bk-small", torch_dtype=torch.float32)' in code
    assert 'pipe = pipe.to("cuda")' in code and "float16" not in code and "load_lora_weights" not in code
    code = _snippet(_card(out, torch_dtype="bfloat16", device="cpu"))
    assert "torch_dtype=torch.bfloat16" in code and 'pipe.to("cpu")' in code and "cuda" not in code
    code = _snippet(_card(out, student_mode="lora", torch_dtype="float16", device="cuda:1"))
    assert 'from_pretrained("me/aria-bk-small", torch_dtype=torch.float16)' in code
    assert 'pipe.load_lora_weights("me/aria-bk-small")' in code and 'pipe.to("cuda:1")' in code
    compile(code, "snippet", "exec")
    # a LoRA-only folder loads the base pipeline first: a Hub id, never a local path
    os.remove(os.path.join(out, "model_index.json"))
    code = _snippet(_card(out, student_mode="lora", base_model=_teacher(tmp_path), device="mps"))
    assert 'from_pretrained("path/to/tiny-teacher", torch_dtype=torch.float32)' in code
    assert str(tmp_path) not in code and 'pipe.load_lora_weights("me/aria-bk-small")' in code
    with pytest.raises(ValueError, match=r"torch_dtype must be one of \['float32', 'float16', 'bfloat16'\].*'fp16'"):
        _card(out, torch_dtype="fp16")
    with pytest.raises(ValueError, match="device.*'cuda'.*'cuda 0'"):
        _card(out, device="cuda 0")


# ----------------------------------------------------------------------------------------------- caches
def test_files_to_upload_skips_caches_logs_and_checkpoints(out):
    ignored = ["teacher_latents/teacher_latents.safetensors", "teacher_latents/teacher_latents.json",
               "regions/embeddings-0123abcd.npy", "regions/embeddings-0123abcd.npy.json",
               "regions/embeddings-0123abcd.npy.partial.npy", "embeddings-0123abcd.npy",
               "logs/events.out", "logs/aria/events.out.tfevents.1", "checkpoint-1/model.safetensors",
               "checkpoint-1/unet/diffusion_pytorch_model.safetensors", "checkpoint-2/optimizer.bin",
               ".regions-tmp-x1y2/region_ids.npy", "regions.old-.regions-tmp-x1y2/region_ids.npy"]
    kept = ["regions/regions_config.json", "regions/centroids.safetensors", "regions/region_ids.npy",
            "model_index.json", "unet/diffusion_pytorch_model.safetensors"]
    for rel in ignored + kept:
        _write(os.path.join(out, *rel.split("/")), b"\x00data")
    files = hub.files_to_upload(out)
    for rel in ignored:
        assert os.path.isfile(os.path.join(out, *rel.split("/")))
        assert rel not in files, rel
    for rel in kept:
        assert rel in files, rel
    # huggingface_hub's own filter, with the patterns push_to_hub passes to upload_folder, agrees
    from huggingface_hub.utils import filter_repo_objects
    assert set(filter_repo_objects(ignored + kept, ignore_patterns=hub.UPLOAD_IGNORE_PATTERNS)) == set(kept)


# ----------------------------------------------------------------------------------------------- large files
def test_secret_scan_finds_a_secret_split_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "SCAN_BLOCK_BYTES", 16, raising=False)
    path = str(tmp_path / "blob.bin")
    for offset in range(0, 60):
        _write(path, b"\x00" * offset + TOKEN.encode() + b"\x00" * 7)
        assert hub._contains_secret(path, TOKEN) == "the Hub token", offset
        _write(path, b"a" * offset + b" " + OTHER_TOKEN.encode() + b" tail")
        assert hub._contains_secret(path, None) == "a string that looks like an HF token (hf_...)", offset
        assert hub._contains_secret(path, TOKEN) == "a string that looks like an HF token (hf_...)", offset
    _write(path, b"\x00" * 100 + b"hf_" + b"x" * 19 + b" " + b"\x00" * 40)
    assert hub._contains_secret(path, TOKEN) is None


def test_push_to_hub_refuses_a_token_inside_a_large_file(out, monkeypatch):
    calls = _patch_hub(monkeypatch)
    block = 2 * 1024 * 1024
    monkeypatch.setattr(hub, "SCAN_BLOCK_BYTES", block, raising=False)
    path = os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")
    data = bytearray(6 * 1024 * 1024)  # binary: only the exact token check applies
    at = 2 * block - len(TOKEN) // 2  # the token straddles the second block boundary
    data[at:at + len(TOKEN)] = TOKEN.encode()
    _write(path, bytes(data))
    with pytest.raises(ValueError, match=r"'unet/diffusion_pytorch_model.safetensors'.*the Hub token") as err:
        hub.push_to_hub(out, "me/aria", token=TOKEN)
    assert TOKEN not in str(err.value) and calls == []
    monkeypatch.setattr(hub, "SCAN_BLOCK_BYTES", 8 * 1024 * 1024)  # the default: one block, past the old 5 MB cap
    with pytest.raises(ValueError, match="the Hub token"):
        hub.push_to_hub(out, "me/aria", token=TOKEN)
    assert calls == []


def test_card_tables_show_local_paths_by_their_last_component(out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "builtin").write_text("a local file that happens to be named builtin")
    text = _card(out, train_settings={"prompt_pool": "/home/me/data/prompts.txt", "output_dir": "./runs/a",
                                      "dataset_name": "lambdalabs/naruto-blip-captions", "prompt_pool_split": "train",
                                      "cache_dir": "~/hf/cache", "learning_rate": 1e-4},
                 teacher_report={"path": str(tmp_path / "teachers" / "tiny"), "pool": "builtin"})
    assert "/home/me" not in text and "./runs" not in text and "~/hf" not in text and str(tmp_path) not in text
    for key, shown in (("prompt_pool", "prompts.txt"), ("output_dir", "a"), ("cache_dir", "cache"), ("path", "tiny"),
                       ("dataset_name", "lambdalabs/naruto-blip-captions"), ("prompt_pool_split", "train"),
                       ("pool", "builtin")):
        assert f"| `{key}` | {shown} |" in text, key

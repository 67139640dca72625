"""Tests for diffusers_aria.publish.model_card: front matter, ARIA's sections, license and base model (never the network)."""

from __future__ import annotations

import json
import os
import socket
import struct
import zlib

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from diffusers_aria.publish import hub, model_card

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
        {"region": k, "name": f"topic {k}", "size": 10 + k, "prompt_share": 1.0 / n, "probability": 1.0 / n,
         "estimate": 0.5 + k / n, "uncertainty": None, "effective_count": 3.0, "draw_share": 1.0 / n}
        for k in range(n)
    ]
    return {"policy": "aria", "step": 200, "metrics": {"aria/entropy": 1.0}, "regions": regions}


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


@pytest.fixture
def out(tmp_path) -> str:
    """A fake final training output folder (pipeline, ARIA report, allocation plot)."""
    d = str(tmp_path / "student")
    _write(os.path.join(d, "model_index.json"), json.dumps({"_class_name": "StableDiffusionPipeline"}))
    _write(os.path.join(d, "unet", "config.json"), json.dumps({"sample_size": 64}))
    _write(os.path.join(d, "aria_report.json"), json.dumps(_report(3)))
    _write(os.path.join(d, "aria_allocation.png"), _png_bytes())
    return d


def _card(out: str, **kw) -> str:
    args = dict(base_model="runwayml/stable-diffusion-v1-5", repo_id="me/aria-bk-small", architecture="bk_small",
                student_mode="full", aria_settings={"policy": "aria", "num_regions": 3, "temperature": 1.0},
                license="creativeml-openrail-m")
    args.update(kw)
    path = model_card.write_model_card(out, **args)
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
    assert "| region | name | size | prompt share | probability | estimate | draw_share |" in text
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
    real = model_card.hf_hub_download

    def recording(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(model_card, "hf_hub_download", recording)

    def add_card(repo_id: str, card: str) -> None:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        _write(str(repo / "refs" / "main"), commit)
        _write(str(repo / "snapshots" / commit / "README.md"), card)

    add_card.calls = calls
    return add_card


def test_teacher_license_local_folder_and_cached_hub_card(tmp_path, hub_cache):
    sd_card = "---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n# SD\n"
    assert model_card.teacher_license(_teacher(tmp_path, "a", card=sd_card)) == "creativeml-openrail-m"
    assert model_card.teacher_license(_teacher(tmp_path, "b")) is None  # no README.md
    assert model_card.teacher_license(_teacher(tmp_path, "c", card="# no front matter\n")) is None
    assert model_card.teacher_license(_teacher(tmp_path, "d", card="---\ntags: [x]\n---\n")) is None
    assert model_card.teacher_license(_teacher(tmp_path, "e", card="---\nlicense: [unclosed\n---\n")) is None
    assert model_card.teacher_license(str(tmp_path / "missing" / "teacher")) is None

    # a Hub id: only the locally cached card is read, never the network
    hub_cache("me/sd-teacher", sd_card)
    assert model_card.teacher_license("me/sd-teacher") == "creativeml-openrail-m"
    assert model_card.teacher_license("me/not-cached") is None
    assert hub_cache.calls and all(k.get("local_files_only") is True for k in hub_cache.calls)
    # a local folder without a license falls back to the cached card of the Hub id it records
    copy = _teacher(tmp_path, "f", model_index={"_class_name": "StableDiffusionPipeline",
                                                "_name_or_path": "me/sd-teacher"})
    assert model_card.teacher_license(copy) == "creativeml-openrail-m"


def test_resolve_license_explicit_then_teacher_then_error(tmp_path, hub_cache):
    with_card = _teacher(tmp_path, "with-card", card="---\nlicense: mit\n---\n")
    assert model_card.resolve_license(with_card, "apache-2.0") == "apache-2.0"  # explicit wins
    assert model_card.resolve_license(with_card, None) == "mit"
    bare = _teacher(tmp_path, "bare")
    for teacher in (bare, "me/not-cached"):
        with pytest.raises(ValueError, match="--license") as err:
            model_card.resolve_license(teacher, None)
        msg = str(err.value)
        assert teacher in msg and "creativeml-openrail-m" in msg and "apache-2.0" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="license"):
        model_card.resolve_license(bare, "")


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


# ----------------------------------------------------------------------------------------------- card structure
def test_card_front_matter_is_model_card_data_and_sections_are_arias(out, tmp_path):
    path = model_card.write_model_card(
        out, base_model="runwayml/stable-diffusion-v1-5", repo_id="me/aria-bk-small", architecture="bk_small",
        student_mode="lora", aria_settings={"policy": "aria"}, aria_report=_report(3),
        allocation_plot="aria_allocation.png", train_settings={"learning_rate": 1e-4},
        teacher_report={"init": "copied"}, license="creativeml-openrail-m")
    card = ModelCard.load(path)  # huggingface_hub reads back what it wrote
    assert card.data.to_dict() == {
        "base_model": "runwayml/stable-diffusion-v1-5", "library_name": "diffusers",
        "license": "creativeml-openrail-m", "pipeline_tag": "text-to-image", "inference": True,
        "tags": ["stable-diffusion", "text-to-image", "diffusers", "distillation", "aria", "bk-sdm", "lora"]}
    headings = [ln for ln in card.text.splitlines() if ln.startswith("#")]
    assert headings == ["# aria-bk-small", "## Model description", "## How to use", "## ARIA settings",
                        "## Per-region allocation", "## Allocation over training", "## Training settings",
                        "## Teacher and student initialisation", "## Limitations and bias"]
    assert "TODO" not in card.text  # diffusers' training template placeholders are not used
    # a local teacher without a Hub id: the same front matter without base_model
    card = ModelCard.load(model_card.write_model_card(
        out, base_model=str(tmp_path / "teachers" / "mine"), repo_id=None, architecture="bk_tiny",
        student_mode="full", aria_settings={}, license="apache-2.0"))
    assert "base_model" not in card.data.to_dict() and card.data.license == "apache-2.0"
    assert "lora" not in card.data.tags
    assert [ln for ln in card.text.splitlines() if ln.startswith("#")][0] == "# student"


def test_card_is_rebuilt_not_merged_into_an_existing_one(out):
    stale = "---\nlicense: mit\nbase_model: someone/else\ndatasets:\n- old/data\n---\n# old card\n\nold body\n"
    _write(os.path.join(out, "README.md"), stale)
    text = _card(out)
    meta = _meta(text)
    assert meta["license"] == "creativeml-openrail-m" and meta["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert "datasets" not in meta and "old card" not in text and "old body" not in text


def test_card_images_that_would_not_be_uploaded_are_copied(out, tmp_path):
    _write(os.path.join(out, "logs", "grid.png"), _png_bytes())  # inside the folder, but logs/ is never uploaded
    text = _card(out, validation_image="logs/grid.png")
    assert "![validation images](images/grid.png)" in text
    assert os.path.isfile(os.path.join(out, "images", "grid.png"))
    assert hub.would_upload("images/grid.png") and not hub.would_upload("logs/grid.png")
    scratch = tmp_path / "grid.tmp.png"  # its name matches an ignore pattern wherever it is copied
    _write(str(scratch), _png_bytes())
    with pytest.raises(ValueError, match="validation_image file name 'grid.tmp.png'.*ignore pattern"):
        _card(out, validation_image=str(scratch))


def test_hub_keeps_the_card_api_importable():
    from diffusers_aria.publish.model_card import resolve_license, teacher_license, write_model_card

    assert write_model_card is model_card.write_model_card
    assert (resolve_license, teacher_license) == (model_card.resolve_license, model_card.teacher_license)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hub.nope  # noqa: B018


def test_tags_follow_the_family_and_the_student_design():
    assert model_card.card_tags("StableDiffusionPipeline", "bk_small", "full") == [
        "stable-diffusion", "text-to-image", "diffusers", "distillation", "aria", "bk-sdm"]
    assert model_card.card_tags("StableDiffusionXLPipeline", "koala_700m", "lora") == [
        "stable-diffusion-xl", "text-to-image", "diffusers", "distillation", "aria", "koala", "lora"]
    assert model_card.card_tags("StableDiffusion3Pipeline", "dit_every_other", "full") == [
        "sd3", "text-to-image", "diffusers", "distillation", "aria"]

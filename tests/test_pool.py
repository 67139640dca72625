"""Prompt pool loading, validation and fingerprinting (diffusers_aria/pool.py)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from diffusers_aria.pool import (
    PROMPT_COLUMN,
    PromptPoolError,
    count_unique,
    get_prompts,
    iter_prompt_batches,
    load_prompt_pool,
    pool_fingerprint,
)

PROMPTS = ["a red fox in the snow", "a bowl of ramen", "an astronaut riding a horse", "a violin, oil painting"]


def _as_list(ds) -> list[str]:
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == [PROMPT_COLUMN]
    return list(ds[PROMPT_COLUMN])


# ------------------------------------------------------------------------------------------- sources


def test_list_source():
    assert _as_list(load_prompt_pool(PROMPTS)) == PROMPTS


def test_tuple_and_generator_sources():
    assert _as_list(load_prompt_pool(tuple(PROMPTS))) == PROMPTS
    assert _as_list(load_prompt_pool(p for p in PROMPTS)) == PROMPTS


def test_dataset_source_with_column_selection():
    ds = datasets.Dataset.from_dict({"id": list(range(4)), "caption": PROMPTS, "other": ["x"] * 4})
    assert _as_list(load_prompt_pool(ds)) == PROMPTS  # auto-detected "caption"
    assert _as_list(load_prompt_pool(ds, column="other")) == ["x"] * 4
    # a Dataset that already has a `prompt` column keeps it
    assert _as_list(load_prompt_pool(datasets.Dataset.from_dict({"prompt": PROMPTS}))) == PROMPTS


def test_dataset_source_single_column_with_any_name():
    ds = datasets.Dataset.from_dict({"whatever": PROMPTS})
    assert _as_list(load_prompt_pool(ds)) == PROMPTS


def test_dataset_source_ambiguous_columns_asks_for_column():
    ds = datasets.Dataset.from_dict({"a": PROMPTS, "b": PROMPTS})
    with pytest.raises(PromptPoolError, match=r"pass column=\.\.\."):
        load_prompt_pool(ds)


def test_txt_source(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n\n", encoding="utf-8")  # trailing blank lines are dropped
    assert _as_list(load_prompt_pool(str(path))) == PROMPTS
    assert _as_list(load_prompt_pool(path)) == PROMPTS  # os.PathLike


def test_txt_source_crlf_and_unicode(tmp_path):
    path = tmp_path / "pool.txt"
    prompts = ["ein Fuchs im Schnee", "\u5bff\u53f8\u306e\u76db\u308a\u5408\u308f\u305b", "caf\u00e9 au lait"]
    path.write_bytes("\r\n".join(prompts).encode("utf-8"))
    assert _as_list(load_prompt_pool(str(path))) == prompts


def test_csv_source_with_column_selection(tmp_path):
    path = tmp_path / "pool.csv"
    lines = ["id,caption,note"] + [f'{i},"{p}",n{i}' for i, p in enumerate(PROMPTS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert _as_list(load_prompt_pool(str(path))) == PROMPTS
    assert _as_list(load_prompt_pool(str(path), column="note")) == [f"n{i}" for i in range(4)]


def test_tsv_source_with_column_selection(tmp_path):
    path = tmp_path / "pool.tsv"
    lines = ["Prompt\tCategory"] + [f"{p}\tcat{i % 2}" for i, p in enumerate(PROMPTS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert _as_list(load_prompt_pool(str(path))) == PROMPTS  # "Prompt" auto-detected
    assert _as_list(load_prompt_pool(str(path), column="Category")) == ["cat0", "cat1", "cat0", "cat1"]


def test_jsonl_source_with_column_selection(tmp_path):
    path = tmp_path / "pool.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, p in enumerate(PROMPTS):
            fh.write(json.dumps({"text": p, "idx": i, "label": f"l{i}"}) + "\n")
    assert _as_list(load_prompt_pool(str(path))) == PROMPTS
    assert _as_list(load_prompt_pool(str(path), column="label")) == [f"l{i}" for i in range(4)]


def test_parquet_source_with_column_selection(tmp_path):
    path = tmp_path / "pool.parquet"
    datasets.Dataset.from_dict({"caption": PROMPTS, "alt": [p.upper() for p in PROMPTS]}).to_parquet(str(path))
    assert _as_list(load_prompt_pool(str(path))) == PROMPTS
    assert _as_list(load_prompt_pool(str(path), column="alt")) == [p.upper() for p in PROMPTS]


def test_save_to_disk_folder_source(tmp_path):
    folder = tmp_path / "pool_ds"
    datasets.Dataset.from_dict({"caption": PROMPTS, "n": list(range(4))}).save_to_disk(str(folder))
    assert _as_list(load_prompt_pool(str(folder))) == PROMPTS


# ------------------------------------------------------------------------------------------- errors


def test_empty_list_raises():
    with pytest.raises(PromptPoolError, match="is empty"):
        load_prompt_pool([])


def test_empty_dataset_raises():
    with pytest.raises(PromptPoolError, match="is empty"):
        load_prompt_pool(datasets.Dataset.from_dict({"prompt": []}))


def test_empty_txt_raises(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(PromptPoolError, match="is empty"):
        load_prompt_pool(str(path))


@pytest.mark.parametrize("bad", ["", "   ", "\t"])
def test_blank_prompt_in_list_raises_naming_the_row(bad):
    with pytest.raises(PromptPoolError, match=r"prompt 2 .*is blank"):
        load_prompt_pool(["ok", "fine", bad, "also fine"])


def test_blank_line_in_txt_raises(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("first\n\nthird\n", encoding="utf-8")
    with pytest.raises(PromptPoolError, match=r"prompt 1 .*is blank"):
        load_prompt_pool(str(path))


def test_none_prompt_raises():
    with pytest.raises(PromptPoolError, match=r"prompt 1 .*NoneType.*not a string"):
        load_prompt_pool(["ok", None, "fine"])


def test_non_string_prompt_raises():
    with pytest.raises(PromptPoolError, match=r"prompt 0 .*int.*not a string"):
        load_prompt_pool([3, "fine"])


def test_none_and_blank_in_dataset_raise():
    with pytest.raises(PromptPoolError, match=r"prompt 1 .*NoneType"):
        load_prompt_pool(datasets.Dataset.from_dict({"prompt": ["ok", None, "x"]}))
    with pytest.raises(PromptPoolError, match=r"prompt 2 .*is blank"):
        load_prompt_pool(datasets.Dataset.from_dict({"prompt": ["ok", "x", "  "]}))


def test_missing_value_in_csv_raises(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text("caption,n\nfirst,1\n,2\nthird,3\n", encoding="utf-8")
    with pytest.raises(PromptPoolError, match=r"prompt 1 .*not a string"):
        load_prompt_pool(str(path))


def test_non_string_column_raises(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(json.dumps({"n": i}) for i in range(3)) + "\n", encoding="utf-8")
    with pytest.raises(PromptPoolError, match=r"prompt 0 .*int.*not a string"):
        load_prompt_pool(str(path))


def test_unknown_column_raises_listing_available():
    ds = datasets.Dataset.from_dict({"caption": PROMPTS, "id": list(range(4))})
    with pytest.raises(PromptPoolError, match=r"column 'nope' not found.*available columns: \['caption', 'id'\]"):
        load_prompt_pool(ds, column="nope")


def test_unknown_column_in_file_raises(tmp_path):
    path = tmp_path / "pool.tsv"
    path.write_text("Prompt\tCategory\na\tb\n", encoding="utf-8")
    with pytest.raises(PromptPoolError, match=r"column 'caption' not found"):
        load_prompt_pool(str(path), column="caption")


def test_unsupported_suffix_raises(tmp_path):
    path = tmp_path / "pool.xlsx"
    path.write_text("irrelevant", encoding="utf-8")
    with pytest.raises(PromptPoolError, match=r"unsupported prompt pool file .*pool\.xlsx"):
        load_prompt_pool(str(path))


def test_missing_path_raises(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(PromptPoolError, match=r"does not exist"):
        load_prompt_pool(str(missing))


def test_unsupported_source_type_raises():
    with pytest.raises(PromptPoolError, match=r"unsupported prompt pool source of type int"):
        load_prompt_pool(42)


def test_pool_error_is_a_value_error():
    from diffusers_aria.utils.errors import UserError

    assert issubclass(PromptPoolError, ValueError) and issubclass(PromptPoolError, UserError)


def test_a_folder_that_is_not_a_saved_dataset_raises(tmp_path):
    (tmp_path / "regions").mkdir()
    (tmp_path / "regions" / "regions_config.json").write_text("{}")
    with pytest.raises(PromptPoolError, match=r"is not a datasets.save_to_disk folder \(state.json missing\)"):
        load_prompt_pool(str(tmp_path / "regions"))


@pytest.mark.parametrize("source", ["nosuch.txt", "data/prompts", "./pool", "/no/such/pool.csv"])
def test_a_missing_local_path_never_reaches_the_hub(tmp_path, monkeypatch, source):
    from diffusers_aria.training.inputs import load_pool

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # "data/prompts" is a path in ./data, not a Hub dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"{source!r} was sent to the Hub"))
    with pytest.raises(PromptPoolError, match=r"does not exist \(looked for "):
        load_pool(source)


# ------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_deterministic_and_matches_for_list_and_dataset():
    assert pool_fingerprint(PROMPTS) == pool_fingerprint(list(PROMPTS))
    assert pool_fingerprint(PROMPTS) == pool_fingerprint(load_prompt_pool(PROMPTS))
    assert pool_fingerprint(PROMPTS).startswith(f"{len(PROMPTS)}:")


def test_fingerprint_changes_when_one_prompt_changes():
    changed = list(PROMPTS)
    changed[2] = changed[2] + "!"
    assert pool_fingerprint(changed) != pool_fingerprint(PROMPTS)
    # also for a change that keeps the total length
    same_len = list(PROMPTS)
    same_len[0] = "b" + same_len[0][1:]
    assert pool_fingerprint(same_len) != pool_fingerprint(PROMPTS)


def test_fingerprint_is_order_sensitive():
    assert pool_fingerprint(PROMPTS[::-1]) != pool_fingerprint(PROMPTS)
    swapped = [PROMPTS[1], PROMPTS[0], *PROMPTS[2:]]
    assert pool_fingerprint(swapped) != pool_fingerprint(PROMPTS)


def test_fingerprint_separates_prompt_boundaries():
    assert pool_fingerprint(["ab", "c"]) != pool_fingerprint(["a", "bc"])


# ------------------------------------------------------------------------------------------- helpers


def test_iter_prompt_batches_covers_pool_in_order():
    ds = load_prompt_pool(PROMPTS)
    for source in (PROMPTS, ds):
        batches = list(iter_prompt_batches(source, batch_size=3))
        assert [len(b) for b in batches] == [3, 1]
        assert [p for b in batches for p in b] == PROMPTS


def test_count_unique():
    assert count_unique(PROMPTS + PROMPTS[:2]) == len(PROMPTS)
    assert count_unique(load_prompt_pool(["a", "a", "b"])) == 2


def test_get_prompts_list_and_dataset():
    ds = load_prompt_pool(PROMPTS)
    idx = np.array([3, 0, 3])
    expected = [PROMPTS[3], PROMPTS[0], PROMPTS[3]]
    assert get_prompts(PROMPTS, idx) == expected
    assert get_prompts(ds, idx) == expected
    assert get_prompts(ds, np.array([], dtype=np.int64)) == []

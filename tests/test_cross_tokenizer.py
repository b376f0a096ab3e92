"""One dump, any student: teacher rows restated for a student with another tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.toy.other_tokenizers import with_new_bpe, with_permuted_ids
from shared.mllm import FinalHidden, load_encoder
from shared.prompt import llava_messages
from shared.token_alignment import VocabMap, align_turn, token_surfaces
from student_train.config import TrainConfig
from student_train.cross_tokenizer import TokenBridge
from student_train.data import MimicExample, PrefExample, collate_mimic, collate_pref
from student_train.objectives import mimic_terms, pref_terms

WORDS = ["a red circle at top left", "triangle", "yes", "no", "two", "the purple diamond is at bottom right",
         "Describe the image.", "  spaced  out ", "naïve café €5"]


@pytest.fixture(scope="module")
def students(tmp_path_factory, moe_student) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("other_tokenizers")
    return {"bpe300": with_new_bpe(moe_student, root / "bpe300", 300),
            "permuted": with_permuted_ids(moe_student, root / "permuted")[0]}


def _metaspace_tokenizer(out: Path):
    """A SentencePiece-style BPE (`▁` for spaces, <0xNN> byte fallback) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipelines.toy.world import all_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback()])
    tok.train_from_iterator(all_texts(), trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"],
                                                             show_progress=False))
    spec = json.loads(tok.to_str())  # the byte-fallback pieces are ordinary vocabulary entries, as in Llama's
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(str(out))
    return fast


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_surfaces_spell_the_text_they_tokenise(kind, teacher, tmp_path):
    tok = load_encoder(teacher).tokenizer if kind == "byte_level" else _metaspace_tokenizer(tmp_path)
    surfaces = token_surfaces(tok)
    for text in WORDS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        spelled = b"".join(surfaces[i] for i in ids)
        # Metaspace prepends a space to text that does not start with one (prepend_scheme="first")
        expected = (text if kind == "byte_level" or text.startswith(" ") else " " + text).encode()
        assert spelled == expected, (kind, text, tok.convert_ids_to_tokens(ids))
    assert all(surfaces[i] is None for i in tok.all_special_ids)


def test_the_vocabulary_map_pairs_equal_spellings_only(teacher, students):
    t, s = load_encoder(teacher).tokenizer, load_encoder(students["bpe300"]).tokenizer
    vocab = VocabMap.between(t, s)
    s_by_surface = {b: i for i, b in enumerate(vocab.student_surfaces) if b}
    for i, surface in enumerate(vocab.teacher_surfaces):
        j = int(vocab.teacher_to_student[i])
        if surface is None:  # special tokens: by content
            content = t.convert_ids_to_tokens(i)
            assert j == (s.convert_tokens_to_ids(content) if content in s.get_vocab() else -1)
        else:
            assert (j >= 0) == (surface in s_by_surface)
            assert j < 0 or vocab.student_surfaces[j] == surface
    assert 0.5 < vocab.mapped_share() < 1.0  # another BPE: most, not all, tokens have a counterpart
    # first_token: a token the student lacks goes to the student's first token of its text
    projected = VocabMap.between(t, s, project="first_token")
    assert projected.mapped_share() > vocab.mapped_share()
    for i, surface in enumerate(vocab.teacher_surfaces):
        j, p = int(vocab.teacher_to_student[i]), int(projected.teacher_to_student[i])
        if j >= 0:
            assert p == j
        elif p >= 0:
            first = s(surface.decode(), add_special_tokens=False)["input_ids"][0]
            assert p == first and surface.startswith(projected.student_surfaces[p]) and surface != \
                projected.student_surfaces[p]
    triangle = t.convert_tokens_to_ids("\u0120triangle")
    assert s.convert_ids_to_tokens(int(projected.teacher_to_student[triangle])) == \
        s.convert_ids_to_tokens(s(" triangle", add_special_tokens=False)["input_ids"][0])
    assert VocabMap.between(t, load_encoder(students["permuted"]).tokenizer).mapped_share() == 1.0


def _offsets_pairs(t_tok, s_tok, text: str) -> list[int]:
    """Independent: the tokenizers' own character offsets; a student token pairs with the teacher
    token that starts at the same character."""
    t_starts = [a for a, _ in t_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    s_starts = [a for a, _ in s_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    return [t_starts.index(a) if a in t_starts else -1 for a in s_starts]


def test_positions_pair_where_both_tokens_start_at_one_character(teacher, students):
    t, s = load_encoder(teacher).tokenizer, load_encoder(students["bpe300"]).tokenizer
    vocab = VocabMap.between(t, s)
    t_end, s_end = t.eos_token_id, s.eos_token_id
    unpaired = 0
    for text in WORDS:
        if any(ord(c) > 127 for c in text):  # offsets are in characters, surfaces in bytes
            continue
        t_ids = t(text, add_special_tokens=False)["input_ids"] + [t_end]
        s_ids = s(text, add_special_tokens=False)["input_ids"] + [s_end]
        pairs = align_turn(t_ids, s_ids, vocab)
        assert pairs == _offsets_pairs(t, s, text) + [len(t_ids) - 1], text
        unpaired += pairs.count(-1)
    assert unpaired > 0  # the two BPEs do disagree somewhere
    same = t("triangle at top", add_special_tokens=False)["input_ids"] + [t_end]
    assert align_turn(same, same, VocabMap.between(t, t)) == list(range(len(same)))
    # a boundary space kept by one template in the prompt: the first token cannot pair, the rest do
    lead = t(" triangle at top", add_special_tokens=False)["input_ids"] + [t_end]
    pairs = align_turn(lead, same, VocabMap.between(t, t))
    assert pairs[-1] == len(lead) - 1 and pairs[0] == -1 and sum(p >= 0 for p in pairs) >= len(same) - 2


def test_unmapped_teacher_mass_joins_the_rest_and_shared_counterparts_merge(teacher, students):
    t = load_encoder(teacher).tokenizer
    vocab = VocabMap.between(t, load_encoder(students["bpe300"]).tokenizer)
    bridge = TokenBridge(vocab)
    missing = [i for i in range(len(t)) if vocab.teacher_to_student[i] < 0 and vocab.teacher_surfaces[i]][:2]
    present = [i for i in range(len(t)) if vocab.teacher_to_student[i] >= 0 and vocab.teacher_surfaces[i]][:3]
    ids = np.array([[present[0], missing[0], present[1], missing[1]]])
    probs = np.array([[0.4, 0.3, 0.1, 0.05]])
    out_ids, lps, rest, usable, mapped = bridge._map_rows(ids, np.log(probs).astype(np.float32),
                                                          np.array([0.15], np.float32), {})
    assert usable.all() and rest[0] == pytest.approx(0.15 + 0.35, abs=1e-6)
    assert np.isneginf(lps[0, [1, 3]]).all() and mapped[0] == pytest.approx(0.5, abs=1e-6)
    assert out_ids[0, 0] == vocab.teacher_to_student[present[0]]
    # two teacher ids, one student counterpart: one entry holds both probabilities
    twin = vocab.teacher_to_student.copy()
    twin[present[2]] = twin[present[0]]
    merged = TokenBridge(VocabMap(twin, vocab.teacher_surfaces, vocab.student_surfaces))
    _, lps2, _, _, mapped2 = merged._map_rows(np.array([[present[0], present[2]]]),
                                              np.log(np.array([[0.5, 0.2]])).astype(np.float32),
                                              np.array([0.3], np.float32), {})
    assert np.exp(lps2[0, 0]) == pytest.approx(0.7, abs=1e-6) and np.isneginf(lps2[0, 1])
    assert mapped2[0] == pytest.approx(0.7, abs=1e-6)


def _teacher_rows(world: Path, teacher: Path, n: int, k: int = 8, seed: int = 0) -> list[MimicExample]:
    """Mimic examples in the teacher's ids with random (but proper) teacher distributions."""
    enc = load_encoder(teacher)
    rng = np.random.default_rng(seed)
    out = []
    for line in (world / "mimic.jsonl").read_text().splitlines()[:n]:
        rec = json.loads(line)
        messages = llava_messages(rec["conversations"], True)
        responses = enc.response_ids(messages)
        t = sum(len(r) for r in responses)
        logits = rng.normal(size=(t, len(enc.tokenizer))) * 3
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        top = np.argsort(-lp, -1)[:, :k]
        top_lp = np.take_along_axis(lp, top, -1)
        rest = 1.0 - np.exp(top_lp).sum(-1)
        out.append(MimicExample(messages, responses, top.tolist(), top_lp.astype(np.float32).tolist(),
                                rest.astype(np.float32).tolist(), [Image.open(world / rec["image"]).convert("RGB")]))
    return out


def _steps(model_dir: Path, examples, bridge, cfg: TrainConfig, steps: int = 3) -> list[tuple[float, float]]:
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    enc = load_encoder(model_dir)
    body = FinalHidden.of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = collate_mimic(enc, examples, bridge)
    out = []
    for _ in range(steps):
        terms = mimic_terms(model, batch, cfg, body, len(enc.tokenizer))
        (terms["objective"] / batch.tokens).backward()
        opt.step()
        opt.zero_grad()
        out.append((float(terms["kl"].detach()), float(terms["ce"].detach())))
    return out


@pytest.mark.parametrize("tail", ["rest", "renorm"])
def test_a_permuted_id_student_learns_exactly_what_the_same_tokenizer_student_does(tail, teacher, world,
                                                                                   moe_student, students):
    """An equivalent model under other ids: every position and id maps, so the cross-tokenizer rows
    are the same-tokenizer rows renamed, and three SGD steps give the same losses."""
    examples = _teacher_rows(world, teacher, 4)
    permuted = load_encoder(students["permuted"])
    bridge = TokenBridge(VocabMap.between(load_encoder(teacher).tokenizer, permuted.tokenizer))
    coverage = bridge.coverage(permuted, examples)
    assert coverage.position_share == 1.0 and coverage.mass_share == pytest.approx(1.0)
    cfg = TrainConfig(kd_tail=tail, ce_weight=0.5)
    same = _steps(moe_student, examples, None, cfg)
    cross = _steps(students["permuted"], examples, bridge, cfg)
    assert same[0] != same[-1]  # it did learn
    np.testing.assert_allclose(np.array(cross), np.array(same), rtol=1e-5, atol=1e-6)


def test_another_bpe_student_gets_paired_rows_and_ce_elsewhere(teacher, world, students):
    examples = _teacher_rows(world, teacher, 6)
    enc = load_encoder(students["bpe300"])
    bridge = TokenBridge(VocabMap.between(load_encoder(teacher).tokenizer, enc.tokenizer))
    batch = collate_mimic(enc, examples, bridge)
    assert batch.kd_mask is not None and 0 < int(batch.kd_mask.sum()) < batch.tokens
    targets = batch.inputs["input_ids"][batch.rows, batch.cols + 1]
    own = [i for e in examples for t in enc.response_ids(e.messages) for i in t]
    assert targets.tolist() == own  # the labels are the student's own tokens
    assert int(batch.topk_ids.max()) < len(enc.tokenizer)
    coverage = bridge.coverage(enc, examples)
    assert 0.5 < coverage.position_share < 1.0 and 0.0 < coverage.mass_share < 1.0
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(students["bpe300"]), dtype=torch.float32)
    terms = mimic_terms(model, batch, TrainConfig(), FinalHidden.of(model), len(enc.tokenizer))
    assert torch.isfinite(terms["objective"]) and float(terms["kl"]) > 0


def test_preference_pairs_are_scored_in_the_students_own_tokens(teacher, world, moe_student, students):
    """Sequence log-probs do not depend on the ids' names: the permuted student's DPO terms equal the
    same-tokenizer student's."""
    from transformers import AutoModelForImageTextToText

    from shared.prompt import pref_messages

    enc = load_encoder(teacher)
    examples = []
    for line in (world / "pref.jsonl").read_text().splitlines()[:4]:
        rec = json.loads(line)
        chosen = pref_messages(rec["question"], rec["chosen"], True)
        rejected = pref_messages(rec["question"], rec["rejected"], True)
        examples.append(PrefExample(chosen, rejected, enc.response_ids(chosen)[0], enc.response_ids(rejected)[0],
                                    -3.0, -5.0, [Image.open(world / rec["image"]).convert("RGB")]))
    permuted = load_encoder(students["permuted"])
    cross = TokenBridge(VocabMap.between(enc.tokenizer, permuted.tokenizer))
    results = []
    for model_dir, bridge in ((moe_student, None), (students["permuted"], cross)):
        e = load_encoder(model_dir)
        model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
        batch = collate_pref(e, examples, bridge)
        terms = pref_terms(model, batch, TrainConfig(stage="pref"), FinalHidden.of(model), len(e.tokenizer))
        results.append([float(terms[k]) for k in ("dpo_loss", "reward_margin", "ce")])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5)


def _lmod(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True)


def test_lmod_takes_the_cross_tokenizer_path_by_itself(hf_dump, world, students, tmp_path):
    info = _lmod("shards", "info", str(hf_dump), "--student", str(students["bpe300"]))
    assert info.returncode == 0, info.stderr
    figures = json.loads(info.stdout)["student"]
    # A 300-token BPE splits most one-token answers (" yes", " red") in two: some, not all, positions pair.
    assert 0.3 < figures["paired_positions"] < 1.0 and 0 < figures["mapped_topk_mass"] <= 1.0
    config = tmp_path / "c.yaml"
    config.write_text("steps: 2\nbatch_size: 4\nloader_workers: 0\nlog_every: 1\nmin_paired: 0.3\n")
    run = _lmod("train", "--stage", "mimic", "--shards", str(hf_dump), "--student", str(students["bpe300"]),
                "--out", str(tmp_path / "mimic"), "--config", str(config), "--image-root", str(world))
    assert run.returncode == 0, run.stderr
    said = [line for line in run.stderr.splitlines() if "cross-tokenizer distillation" in line]
    assert len(said) == 1 and f"{figures['paired_positions']:.1%}" in said[0], run.stderr
    assert np.isfinite(json.loads(run.stdout)["loss"])
    pref = _lmod("train", "--stage", "pref", "--shards", str(hf_dump), "--student", str(students["bpe300"]),
                 "--out", str(tmp_path / "pref"), "--config", str(config), "--image-root", str(world))
    assert pref.returncode == 0, pref.stderr
    assert np.isfinite(json.loads(pref.stdout)["dpo_loss"])
    # too little pairs: refused with the figure
    config.write_text("steps: 2\nbatch_size: 4\nloader_workers: 0\nmin_paired: 0.99\n")
    refused = _lmod("train", "--stage", "mimic", "--shards", str(hf_dump), "--student", str(students["bpe300"]),
                    "--out", str(tmp_path / "refused"), "--config", str(config), "--image-root", str(world))
    assert refused.returncode == 2 and "below min_paired 99%" in refused.stderr
    assert f"{figures['paired_positions']:.1%}" in refused.stderr


def test_a_dump_without_its_teacher_tokenizer_says_what_to_do(hf_dump, students, tmp_path):
    import shutil

    from student_train.cross_tokenizer import AlignmentError

    assert (hf_dump / "teacher_tokenizer" / "tokenizer.json").is_file()
    import os

    umask = os.umask(0)
    os.umask(umask)  # readable by whoever can read the dump (mkdtemp made it 0700)
    assert (hf_dump / "teacher_tokenizer").stat().st_mode & 0o777 == 0o777 & ~umask
    old = tmp_path / "old"
    shutil.copytree(hf_dump, old, ignore=shutil.ignore_patterns("teacher_tokenizer"))
    with pytest.raises(AlignmentError, match="keeps no teacher tokenizer"):
        TokenBridge.for_dumps([old], load_encoder(students["bpe300"]))
    assert TokenBridge.for_dumps([hf_dump], load_encoder(students["permuted"])) is not None
    damaged = tmp_path / "damaged"
    shutil.copytree(hf_dump, damaged)
    (damaged / "teacher_tokenizer" / "tokenizer.json").write_text("garbage")
    with pytest.raises(AlignmentError, match=r"teacher_tokenizer: unreadable \(.*\); copy the teacher's tokenizer"):
        TokenBridge.for_dumps([damaged], load_encoder(students["bpe300"]))


def test_the_tiny_families_tokenizer_maps_every_teacher_token(teacher, family_tok):
    """The families' tokenizer is the world's BPE plus their special tokens at other ids: every
    teacher token has its counterpart and every position pairs."""
    t = load_encoder(teacher).tokenizer
    vocab = VocabMap.between(t, family_tok)
    real = [i for i, s in enumerate(vocab.teacher_surfaces) if s is not None]
    assert all(vocab.teacher_to_student[i] >= 0 for i in real) and vocab.mapped_share() == 1.0
    end = t.convert_tokens_to_ids("<end_of_utterance>")
    assert family_tok.convert_ids_to_tokens(int(vocab.teacher_to_student[end])) == "<end_of_utterance>"
    for text in WORDS[:6]:
        a = t(text, add_special_tokens=False)["input_ids"] + [end]
        b = family_tok(text, add_special_tokens=False)["input_ids"] + [family_tok.convert_tokens_to_ids(
            "<end_of_utterance>")]
        assert align_turn(a, b, vocab) == list(range(len(a)))


def test_positions_inside_a_teacher_token_learn_the_label():
    """Unpaired positions: the KD term is the label's CE (the teacher's continuation of its own
    token is certain), paired ones the KL; the KL column counts paired positions only."""
    from student_train.losses import mimic_token_losses, sparse_kl

    n, v, k = 6, 40, 5
    logits = torch.randn(n, v, dtype=torch.float64)
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(n)])
    lps = torch.log_softmax(torch.randn(n, k, dtype=torch.float64), -1) - 0.3
    rest = 1 - lps.exp().sum(-1)
    targets = torch.randint(0, v, (n,))
    mask = torch.tensor([True, False, True, False, False, True])
    got = mimic_token_losses(logits, ids, lps, rest, targets, kd_weight=2.0, ce_weight=0.5, tail="rest",
                             kd_mask=mask)
    ce = -torch.log_softmax(logits, -1)[torch.arange(n), targets]
    kl = sparse_kl(logits, ids, lps, "rest", rest_mass=rest)
    want = torch.where(mask, 2.0 * kl, 2.0 * ce) + 0.5 * ce
    torch.testing.assert_close(got[:, 0], want)
    torch.testing.assert_close(got[:, 1], torch.where(mask, kl, torch.zeros_like(kl)))

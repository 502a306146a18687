import json
import math

import pytest
import torch

from graphheads.data import IGNORE_INDEX, PAD, SEP, TASKS, ByteTextDataset, TaskSuite, bits_per_byte


def answers(suite: TaskSuite, task: str, n: int = 64):
    batch = suite.sample(n, torch.Generator().manual_seed(0), task=task)
    seq = torch.cat([batch.inputs[:, :1], batch.targets.clamp_min(0)], dim=1)  # rebuild tokens
    scored = torch.cat([torch.zeros(n, 1, dtype=torch.bool), batch.targets != IGNORE_INDEX], dim=1)
    return batch, seq, scored


@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_sequence_tasks_answer_correctly(task):
    suite = TaskSuite(length=5)
    batch, _, scored = answers(suite, task)
    prompt = batch.inputs[:, 1:6] - suite.first_symbol
    answer = batch.targets[scored[:, 1:]].view(-1, 5) - suite.first_symbol
    expected = {"copy": prompt, "reverse": prompt.flip(1), "sort": prompt.sort(1).values}[task]
    assert torch.equal(answer, expected)
    assert (batch.inputs[:, 6] == SEP).all() and (batch.inputs[:, 0] == 2 + TASKS.index(task)).all()


def test_mqar_answers_are_the_values_of_the_queried_keys():
    suite = TaskSuite(length=4, num_symbols=16)
    batch, _, _ = answers(suite, "mqar")
    for row_in, row_t in zip(batch.inputs, batch.targets, strict=True):
        pairs = row_in[1:9].view(4, 2).tolist()
        table = dict(pairs)
        assert len(table) == 4  # distinct keys
        for pos in range(10, row_in.numel(), 2):  # queried keys sit at even offsets after SEP
            if pos < row_in.numel() and row_t[pos] != IGNORE_INDEX:
                assert row_t[pos].item() == table[row_in[pos].item()]
        assert (row_t != IGNORE_INDEX).sum() == 4  # one scored value per query


def test_modadd_is_modular_addition():
    suite = TaskSuite(modulus=7)
    batch, _, _ = answers(suite, "modadd")
    a, b = batch.inputs[:, 1] - suite.first_symbol, batch.inputs[:, 2] - suite.first_symbol
    assert torch.equal(batch.targets[:, 3] - suite.first_symbol, (a + b) % 7)
    assert (batch.targets[:, :3] == IGNORE_INDEX).all() and (
        batch.targets[:, 4:] == IGNORE_INDEX
    ).all()


def test_mixture_is_seeded_padded_and_labelled():
    suite = TaskSuite()
    a = suite.sample(50, torch.Generator().manual_seed(3))
    b = suite.sample(50, torch.Generator().manual_seed(3))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.task_ids, b.task_ids)
    assert a.inputs.shape == (50, suite.max_seq_len)
    assert set(a.task_ids.tolist()) == set(range(len(TASKS)))
    short = a.task_ids == TASKS.index("modadd")
    assert (a.inputs[short, 4:] == PAD).all()
    assert (a.inputs[:, 0] == a.task_ids + 2).all()


def test_unknown_task_and_bad_settings_raise():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['copyy'\]"):
        TaskSuite(["copyy"])
    with pytest.raises(ValueError, match=r"mqar needs length \(9\) <= num_symbols // 2 \(8\)"):
        TaskSuite(length=9)
    with pytest.raises(ValueError, match=r"unknown task 'sort'"):
        TaskSuite(["copy"]).sample(2, torch.Generator(), task="sort")


def test_byte_text_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld " * 40)
    (tmp_path / "b.md").write_text("graph of heads " * 40)
    data = ByteTextDataset(tmp_path, seq_len=16)
    assert data.vocab_size == 256
    total = len("héllo wörld ".encode()) * 40 + 1 + len("graph of heads ") * 40
    assert len(data.train) + len(data.val) == total
    batch = data.sample(4, torch.Generator().manual_seed(0), split="val")
    assert batch.inputs.shape == (4, 16) and torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    (tmp_path / "bad.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"bad.bin is not UTF-8 text"):
        ByteTextDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ByteTextDataset(tmp_path / "missing")


def test_byte_text_folder_under_a_hidden_folder_is_read(tmp_path):
    folder = tmp_path / ".cache" / "corpus"  # hidden above the folder given: irrelevant
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("graph of heads " * 40)
    (folder / ".notes.txt").write_text("hidden inside the folder: skipped " * 40)
    data = ByteTextDataset(folder, seq_len=16)
    assert len(data.train) + len(data.val) == len("graph of heads ") * 40
    empty = tmp_path / "only_hidden"
    empty.mkdir()
    (empty / ".x.txt").write_text("skipped")
    with pytest.raises(ValueError, match=r"the folder .*only_hidden holds no \(non-hidden\) files"):
        ByteTextDataset(empty)


def test_task_batches_mark_their_padding():
    suite = TaskSuite(["copy", "modadd"], length=3)
    batch = suite.sample(8, torch.Generator().manual_seed(0))
    assert batch.padding is not None and batch.padding.shape == batch.inputs.shape
    assert (batch.inputs[batch.padding] == PAD).all()
    assert (batch.targets[batch.padding] == IGNORE_INDEX).all()
    assert not batch.padding[:, 0].any() and batch.padding.any()  # right padding only
    half = batch.rows(slice(2, 5))
    assert torch.equal(half.padding, batch.padding[2:5]) and torch.equal(
        half.inputs, batch.inputs[2:5]
    )


def test_every_window_of_a_split_is_drawn_and_the_shortest_split_works():
    """Byte windows: the last window of a split was never drawn, and a split of exactly
    seq_len + 1 tokens failed in randint."""
    from graphheads.data.text import sample_windows

    data = torch.arange(10)
    gen = torch.Generator().manual_seed(0)
    starts = {int(w[0]) for w in sample_windows(data, 4, 400, gen).inputs}
    assert starts == set(range(10 - 4))  # starts 0..5: the window 5..9 included
    one = sample_windows(torch.arange(5), 4, 3, gen)  # exactly one window
    assert one.inputs.tolist() == [[0, 1, 2, 3]] * 3 and one.targets[0].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="4 tokens hold no window of 5"):
        sample_windows(torch.arange(4), 4, 1, gen)


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_hops_answers_need_every_link(hops):
    """Pointer chasing (issue 33): each queried start's answer is f^k(start) read from
    the prompt's links, and every shorter chain f^j(start), j < k, ends elsewhere, so no
    answer follows from fewer than k lookups; half of the symbols are queried, so the
    earlier answers never pin down the last one."""
    from graphheads.data.tasks import IGNORE_INDEX

    suite = TaskSuite(("copy", "hops"), length=6, num_symbols=16, hops=hops)
    batch = suite.sample(256, torch.Generator().manual_seed(0), task="hops")
    s0, n = suite.first_symbol, suite.length
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        assert inputs[0] == suite.task_token("hops") and inputs[2 * n + 1] == 1  # SEP
        links = dict(zip(inputs[1 : 2 * n : 2], inputs[2 : 2 * n + 1 : 2], strict=True))
        assert len(links) == n and set(links.values()) == set(links)  # a permutation
        queries = inputs[2 * n + 2 :: 2][:3]  # the starts (the last answer is a target)
        scored = [t for t in targets if t != IGNORE_INDEX]
        assert len(queries) == len(scored) == 3 and len(set(queries)) == 3
        for start, answer in zip(queries, scored, strict=True):
            chain = [start]
            for _ in range(hops):
                chain.append(links[chain[-1]])
            assert answer == chain[-1]  # f^k(start)
            assert answer not in chain[:-1]  # fewer hops forwards end elsewhere
            inverse, back = {v: k for k, v in links.items()}, [start]
            for _ in range(hops - 1):  # fewer than k links backwards end elsewhere too
                back.append(inverse[back[-1]])
            assert answer not in back
        assert all(s0 <= t < s0 + suite.num_symbols for t in inputs[1 : 2 * n + 1])
    assert suite.chance_accuracy("hops") == pytest.approx(1 / 5)


def test_hops_is_opt_in_and_keeps_the_default_vocabulary():
    default, with_hops = TaskSuite(), TaskSuite((*TaskSuite().tasks, "hops"))
    assert default.vocab_size == 2 + 5 + 16  # unchanged: old runs load as they were
    assert with_hops.vocab_size == default.vocab_size + 1
    assert with_hops.task_token("hops") == default.vocab_size  # after the symbols
    assert with_hops.task_token("sort") == default.task_token("sort") == 4
    gen = torch.Generator().manual_seed(1)
    row = with_hops.sample(1, gen, task="hops").inputs[0].tolist()
    assert with_hops.render(row).startswith("hops: ")
    tokens, answer = with_hops.encode_prompt("hops", "3 5 5 1 1 3 | 3")
    s0 = with_hops.first_symbol
    assert answer == 1 and tokens.tolist() == [
        [with_hops.task_token("hops"), *(s0 + v for v in (3, 5, 5, 1, 1, 3)), 1, s0 + 3]
    ]
    with pytest.raises(ValueError, match=r"write links x f\(x\), '\|', then the start symbol"):
        with_hops.encode_prompt("hops", "3 5 5")
    with pytest.raises(ValueError, match=r"hops needs 1 <= hops \(4\), 2 x hops <= length"):
        TaskSuite(("hops",), length=6, hops=4)  # 2 links backwards would reach the answer
    with pytest.raises(ValueError, match="each symbol may start one link"):
        with_hops.encode_prompt("hops", "3 5 3 1 | 3")
    with pytest.raises(ValueError, match="the start symbol must start one"):
        with_hops.encode_prompt("hops", "3 5 5 1 | 9")


def test_generate_answers_hops_prompts_with_one_token(tmp_path, capsys):
    """``graphheads generate --task hops`` asked for ``length`` answer tokens (past the
    context) and printed IGNORE_INDEX as the expected answer."""
    from graphheads.cli import main
    from graphheads.train import RunConfig, Trainer

    config = RunConfig.load(None, ["data.tasks=copy,hops", "train.steps=1", "train.batch_size=8",
                                   "train.eval_batches=1", "train.eval_batch_size=8",
                                   "model.d_model=32"])  # fmt: skip
    Trainer(config, tmp_path / "run", progress=False).fit()
    assert main(["generate", "--run", str(tmp_path / "run"), "--task", "hops", "--num", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        expected = json.loads(line.split("(expected ")[1].rstrip(")"))
        assert len(expected) == 1 and 0 <= expected[0] < 16
        assert len(json.loads(line.split("generated ")[1].split(" (")[0])) == 1


def test_a_run_trains_on_hops():
    from graphheads.train import RunConfig, Trainer

    config = RunConfig.load(None, ["data.tasks=hops", "data.hops=3", "train.steps=2",
                                   "train.eval_batches=1", "train.eval_batch_size=8",
                                   "train.batch_size=8", "model.d_model=32"])  # fmt: skip
    trainer = Trainer(config, None, progress=False)
    assert trainer.data.hops == 3 and trainer.model.config.vocab_size == 2 + 5 + 16 + 1
    result = trainer.fit()
    assert set(result.final_eval["accuracy"]) == {"hops"}
    assert result.final_eval["chance"]["hops"] == pytest.approx(1 / 5)

"""GRPO: reward functions exactly, the question readers (and their file:line errors), and grpo_training.py end to end
(rewards logged per function and weighted, the length reward rising, kill -9 resume)."""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from conftest import CHATML_TEMPLATE, build_model, build_tokenizer, requires_shared, shared_path
from medtrain.errors import ConfigError, DataError
from medtrain.questions import load_questions
from medtrain.rewards import (
    accuracy_reward,
    answer_part,
    extract_choice,
    follows_format,
    format_reward,
    length_reward_score,
    looks_mathematical,
    make_length_reward,
    math_equal,
    normalize_text,
)

# --------------------------------------------------------------------------------------------------------------
# Reward functions


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("B. Pancreas", "B"), ("b)", "B"), ("Answer: B", "B"), ("The answer is (c).", "C"),
    ("答案是B", "B"), ("答案：（C）", "C"), ("正确答案为 D。", "D"), ("选A", "A"), ("C、钠（盐）", "C"),
    ("A patient with a fever should rest", None), ("I think so", None), ("答案是E", None), ("", None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text, "ABCD") == letter


def test_extract_choice_reads_letters_beyond_d_when_the_question_has_them():
    assert extract_choice("答案是E", "ABCDE") == "E"


def test_answer_part_and_format():
    assert answer_part("<think>2 + 2</think>\n 4 ") == "4"
    assert answer_part("no think block") == "no think block"
    assert follows_format("<think>\nadd them\n</think>\n4")
    assert follows_format("  <think>x</think>4")
    assert not follows_format("<think>x</think>")  # no answer
    assert not follows_format("<think> </think>4")  # empty reasoning
    assert not follows_format("4 <think>x</think>4")  # text before the block
    assert not follows_format("<think>a</think><think>b</think>4")  # two blocks
    assert not follows_format("x</think>4")
    # a generation prompt that opens the block (Qwen3) counts as its opening
    assert follows_format("x</think>4", prompt="<|im_start|>assistant\n<think>\n")
    assert format_reward(["<think>x</think>4", "4"], prompts=["p", "p"]) == [1.0, 0.0]


def test_normalised_text_and_math_equivalence():
    assert normalize_text("Ｃ. 肺炎。 High, Blood pressure!") == "c肺炎highbloodpressure"
    assert math_equal("The answer is 46", "46") and math_equal("共46个", "46") and math_equal("$\\frac{1}{2}$", "0.5")
    assert not math_equal("47", "46") and not math_equal("no number", "46")
    assert looks_mathematical("46") and looks_mathematical("37.3") and looks_mathematical("\\frac{1}{2}")
    assert not looks_mathematical("食管克罗恩病") and not looks_mathematical("high blood pressure")
    assert not looks_mathematical("第3肋间隙")


def test_accuracy_reward_per_answer_type():
    completions = ["<think>pancreas</think>答案是B", "<think>x</think>B", "<think>200 + 400</think>共600毫克",
                   "601", "<think>...</think>High blood pressure.", "high blood pressure is common"]
    answers = ["B", "C", "600", "600", "high blood pressure", "high blood pressure"]
    kinds = ["choice", "choice", "math", "math", "text", "text"]
    choices = ["ABCD", "ABCD", "", "", "", ""]
    assert accuracy_reward(completions, answer=answers, answer_type=kinds, choices=choices) == \
        [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_length_reward():
    assert length_reward_score(3, True, target=4, limit=8) == 1.0
    assert length_reward_score(4, True, target=4, limit=8) == 1.0
    assert length_reward_score(6, True, target=4, limit=8) == 0.5
    assert length_reward_score(8, False, target=4, limit=8) == 0.0
    length = make_length_reward(target=2, limit=6, stop_ids=[9])
    # completion_ids of finished completions end with the stop token, which is not counted
    assert length(completion_ids=[[1, 9], [1, 2, 9], [1, 2, 3, 4, 9], [1, 2, 3, 4, 5, 6], []]) == \
        [1.0, 1.0, 0.5, 0.0, 0.0]
    assert length.__name__ == "length"
    with pytest.raises(ValueError):
        make_length_reward(target=6, limit=6, stop_ids=[9])


# --------------------------------------------------------------------------------------------------------------
# Question files


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_question_layouts(tmp_path):
    qa = write(tmp_path / "qa.jsonl", json.dumps({"question": "2+2?", "answer": 4}) + "\n" +
               json.dumps({"question": "Name?", "answer": "Aspirin", "system": "Be brief."}) + "\n")
    mc = write(tmp_path / "mc.jsonl", json.dumps({"question": "Organ?", "options": ["Liver", "Pancreas"], "answer": "b"})
               + "\n" + json.dumps({"question": "Q?", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "C"}) + "\n" +
               json.dumps({"question": "Flat?", "A": "x", "B": "y", "answer": "A", "answer_type": "choice"}) + "\n" +
               json.dumps({"question": "Index?", "options": ["x", "y", "z"], "answer": 1}) + "\n")
    csv = write(tmp_path / "exam.csv", ",Question,A,B,C,D,Answer\n0,女性生殖腺是,卵巢,前庭大腺,前庭球,乳腺,A\n"
                '1,"two\nlines",a,b,c,d,C\n')
    rows = load_questions([qa, mc, csv])
    assert [(r["answer"], r["answer_type"], r["choices"]) for r in rows] == [
        ("4", "math", ""), ("Aspirin", "text", ""), ("B", "choice", "AB"), ("C", "choice", "ABC"),
        ("A", "choice", "AB"), ("B", "choice", "ABC"), ("A", "choice", "ABCD"), ("C", "choice", "ABCD")]
    assert rows[1]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name?"}]
    assert rows[2]["messages"] == [{"role": "user", "content": "Organ?\nA. Liver\nB. Pancreas"}]
    assert rows[6]["messages"][0]["content"] == "女性生殖腺是\nA. 卵巢\nB. 前庭大腺\nC. 前庭球\nD. 乳腺"
    assert [r["source"].rsplit(":", 1)[1] for r in rows[6:]] == ["2", "3"]  # a quoted newline: the row's first line
    assert load_questions([qa], default_answer_type="text")[0]["answer_type"] == "text"
    # --answer_type is for open questions: an exam question stays a choice; a CSV without options holds open ones
    assert load_questions([mc], default_answer_type="text")[0]["answer_type"] == "choice"
    open_csv = write(tmp_path / "open.csv", "question,Answer,system\n2+2?,4,Be brief.\n")
    assert load_questions([open_csv]) == [{"messages": [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "2+2?"}],
                                           "answer": "4", "answer_type": "math", "choices": "",
                                           "source": f"{open_csv}:2"}]


@pytest.mark.parametrize("name, text, expected", [
    ("q.jsonl", '{"question": "a", "answer": "b"}\n{"question": "no answer"}\n', "q.jsonl:2: answer: missing the reference answer"),
    ("q.jsonl", '{"question": "a", "answer": "b"}\n{"query": "x", "answer": "b"}\n', "q.jsonl:2: question: no 'question' field"),
    ("q.jsonl", '{"question": "a", "options": ["x", "y"], "answer": "C"}\n', "q.jsonl:1: answer: 'C' is not one of the options A, B (a letter, or a 0-based index below 2)"),
    ("q.jsonl", '{"question": "a", "options": ["x"], "answer": "A"}\n', "q.jsonl:1: options: must be a list of 2 to 5 option texts"),
    ("q.jsonl", '{"question": "a", "options": ["x", "y"], "answer": 2}\n', "q.jsonl:1: answer: 2 is not one of the options A, B (a letter, or a 0-based index below 2)"),
    ("q.jsonl", '{"question": "a", "answer": "b", "answer_type": "essay"}\n', "q.jsonl:1: answer_type: expected one of choice, math, text"),
    ("q.jsonl", '{"question": "a", "answer": "b", "answer_type": "choice"}\n', "q.jsonl:1: options: answer_type choice needs options"),
    ("q.jsonl", '{"question": "a", "answer": ["b"]}\n', "q.jsonl:1: answer: expected a string, got list"),
    ("q.csv", "Question,A,B,Answer\nq,x,y,A\nq,x,y\n", "q.csv:3: 3 fields, the header has 4 (an unquoted comma or quote in a field?)"),
    ("q.jsonl", '{"question": "a", "options": ["x", "y"], "answer": "A", "answer_type": "text"}\n',
     "q.jsonl:1: answer_type: a question with options is scored by its option letter: use choice"),
    ("q.csv", "Question,A,Answer\nq,x,A\n", "q.csv:1: header: missing option columns: need A, B"),
    ("q.csv", "Question,Answer\nq,\n", "q.csv:2: Answer: empty text"),
    ("q.csv", "Question,A,B\nq,x,y\n", "q.csv:1: header: missing column 'Answer' (the CMMLU layout is ,Question,A,B,C,D,Answer; found Question,A,B)"),
])
def test_bad_question_files_name_file_line_and_field(tmp_path, name, text, expected):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        load_questions([path])
    assert expected in str(err.value)


EXAM_CSV = ",Question,A,B,C,D,Answer\n0,女性生殖腺是,卵巢,前庭大腺,前庭球,乳腺,A\n1,\"two\nlines\",a,b,c,d,c\n"
EXAM_JSONL = [
    {"question": "Which organ produces insulin?", "options": ["Liver", "Kidney", "Spleen", "Pancreas"], "answer": "D",
     "subject": "medicine_en"},
    {"question": "Normal body temperature?", "A": "33 °C", "B": " 37 °C ", "answer": 1, "system": "Be brief."},
    {"prompt": "Dose?", "options": {"A": 5, "B": 10, "C": 20}, "answer": "b", "context": "A child weighs 20 kg.",
     "answer_type": "choice"},
]


def test_grpo_reads_the_evaluation_layouts_as_the_evaluator_does(tmp_path):
    """One reader: the benchmark dir the evaluator scores, read by GRPO, gives the same questions, options and
    answers (dev/ worked examples included: GRPO's --train_file_dir reads every file under it)."""
    from medtrain.benchmarks import LETTERS, load_benchmark
    from medtrain.formats import find_data_files
    from medtrain.questions import QUESTION_EXTENSIONS, choice_prompt

    bench = tmp_path / "bench"
    write(bench / "test" / "anatomy.csv", EXAM_CSV)
    write(bench / "dev" / "anatomy.csv", ",Question,A,B,C,D,Answer\n0,dev question,a,b,c,d,B\n")
    write(bench / "mine.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EXAM_JSONL))
    evaluator = {q.source: q for subject in load_benchmark(str(bench)) for q in subject.test + subject.dev}
    rows = load_questions(find_data_files(str(bench), QUESTION_EXTENSIONS))
    assert sorted(r["source"] for r in rows) == sorted(evaluator) and len(rows) == 6
    for row in rows:
        q = evaluator[row["source"]]
        assert row["answer"] == LETTERS[q.answer] and row["choices"] == LETTERS[: len(q.choices)]
        assert row["answer_type"] == "choice"
        assert row["messages"][-1]["content"] == (q.context + "\n" if q.context else "") + choice_prompt(q.question,
                                                                                                         q.choices)
    by_source = {r["source"].rsplit("/", 1)[1]: r for r in rows}
    assert [(by_source[f"anatomy.csv:{n}"]["answer"]) for n in (2, 3)] == ["A", "C"]  # lower-case 'c' read too
    assert by_source["anatomy.csv:3"]["messages"][0]["content"] == "two\nlines\nA. a\nB. b\nC. c\nD. d"
    assert by_source["mine.jsonl:2"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Normal body temperature?\nA. 33 °C\nB. 37 °C"}]
    assert by_source["mine.jsonl:3"]["messages"][0]["content"] == "A child weighs 20 kg.\nDose?\nA. 5\nB. 10\nC. 20"
    assert by_source["mine.jsonl:3"]["answer"] == "B"


BAD_EXAMS = [
    # (file, content, the error both readers give after the file path)
    ("test/anatomy.csv", EXAM_CSV + "2,q,a,b,c,d,E\n", ":5: Answer: answer 'E' is not one of the options A, B, C, D"),
    ("test/anatomy.csv", EXAM_CSV + "2,q,a,,c,d,A\n", ":5: B: option B is empty"),
    ("test/anatomy.csv", EXAM_CSV + "2,q,a,b,c,A\n", ":5: 6 fields, the header has 7 (an unquoted comma or quote in "
     "a field?)"),
    ("test/anatomy.csv", ",Question,A,B,D,Answer\n0,q,a,b,d,A\n", ":1: header: option columns must be A, B, C, ... "
     "without gaps, found ,Question,A,B,D,Answer"),
    ("test/anatomy.csv", ",Question,A,B,C,D\n0,q,a,b,c,d\n", ":1: header: missing column 'Answer' (the CMMLU "
     "layout is ,Question,A,B,C,D,Answer; found ,Question,A,B,C,D)"),
    ("mine.jsonl", '{"question": "q", "options": ["a", "b", "c"], "answer": "D"}\n', ":1: answer: 'D' is not one "
     "of the options A, B, C (a letter, or a 0-based index below 3)"),
    ("mine.jsonl", '{"question": "q", "options": {"A": "a", "C": "c"}, "answer": "A"}\n', ":1: options: as a "
     "mapping, the option keys must be A, B, C, ... in order, got A, C"),
    ("mine.jsonl", '{"question": "q", "A": "a", "B": "b", "D": "d", "answer": "A"}\n', ":1: options: option keys "
     "must be A, B, C, ... without gaps, got A, B, D"),
    ("mine.jsonl", '{"question": "q", "options": ["a", ""], "answer": 0}\n', ":1: options[B]: option text must be "
     "a non-empty string"),
    ("mine.jsonl", '{"question": "q", "options": ["a", "b"]}\n', ":1: answer: missing: the letter of the right "
     "option (A, B) or its 0-based index"),
    ("mine.jsonl", '{"question": "q", "prompt": "q", "options": ["a", "b"], "answer": 0}\n', ":1: prompt: give "
     "the question text once, as 'question' or as 'prompt'"),
]


@pytest.mark.parametrize("name, content, expected", BAD_EXAMS, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD_EXAMS)])
def test_a_bad_exam_record_is_the_same_error_for_grpo_and_the_evaluator(tmp_path, name, content, expected):
    from medtrain.benchmarks import load_benchmark
    from medtrain.formats import LoadReport

    bench = tmp_path / "bench"
    write(bench / "test" / "anatomy.csv", EXAM_CSV)
    path = write(bench / name, content)
    with pytest.raises(DataError) as err:
        load_benchmark(str(bench))
    assert str(err.value) == path + expected
    report = LoadReport()  # GRPO collects every bad record for its --max_invalid_fraction policy
    rows = load_questions([path], report)
    assert [str(e) for e in report.problems + report.file_errors] == [path + expected]
    if ":1: header:" not in expected:  # the good records of the file are kept
        assert len(rows) == report.records[path] - 1


@requires_shared
def test_real_question_files_load():
    qa = load_questions([str(shared_path("data", "medical-zh", "grpo", "medical_qa_32.jsonl"))])
    assert len(qa) == 32 and {r["answer_type"] for r in qa} == {"math", "text"}
    exam = load_questions([str(shared_path("data", "eval", "cmmlu_medical", "test", "anatomy.csv"))])
    assert len(exam) == 148 and all(r["answer_type"] == "choice" and r["answer"] in "ABCD" for r in exam)


# --------------------------------------------------------------------------------------------------------------
# grpo_training.py


def test_reward_flags_are_checked_together(tiny_chat_model_dir, tmp_path):
    import grpo_training

    data = write(tmp_path / "d" / "q.jsonl", '{"question": "a", "answer": "1"}\n')
    with pytest.raises(ConfigError) as err:
        grpo_training.main(["--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", data,
                            "--output_dir", str(tmp_path / "o"), "--reward_funcs", "accuracy", "reward_model"])
    assert "--reward_funcs reward_model needs --reward_model_name_or_path" in str(err.value)
    with pytest.raises(ConfigError) as err:
        grpo_training.main(["--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", data,
                            "--output_dir", str(tmp_path / "o"), "--reward_funcs", "accuracy", "length",
                            "--reward_weights", "1.0", "--length_target_tokens", "900"])
    assert "--reward_weights has 1 value(s) for 2 reward(s)" in str(err.value)
    assert "--length_target_tokens 900 must be between 1 and --max_completion_length 512" in str(err.value)
    with pytest.raises(ConfigError) as err:
        grpo_training.main(["--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", data,
                            "--output_dir", str(tmp_path / "o"), "--validation_split_percentage", "10"])
    assert "the held-out questions would be read (or taken from training) and never used" in str(err.value)
    assert not (tmp_path / "o").exists()


def stops_early_model(path):
    """A tiny chat model whose end-of-turn logit follows one hidden unit: some replies end after 1-2 tokens, others run
    to the limit. The length reward then varies within a group, so GRPO has a signal to learn from."""
    import torch

    tokenizer = build_tokenizer(path, chat_template=CHATML_TEMPLATE)
    model = build_model(path, tokenizer)
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 3.0
    model.save_pretrained(path)
    return path


def test_grpo_rewards_logged_weighted_rising_and_kill9_resume(tmp_path):
    from test_resume import crash_then_resume

    model = stops_early_model(tmp_path / "model")
    data = tmp_path / "data"
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
    rows += [{"question": "Which organ makes insulin?", "options": ["Liver", "Pancreas"], "answer": "B"},
             {"question": "Fever?", "answer": "Rest"}]
    write(data / "q.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def grpo_args(out):
        return ["grpo_training.py", "--model_name_or_path", str(model), "--train_file_dir", str(data),
                "--output_dir", str(out), "--max_steps", "6", "--save_steps", "2", "--per_device_train_batch_size", "8",
                "--num_generations", "4", "--max_completion_length", "8", "--reward_funcs", "accuracy", "format",
                "length", "--reward_weights", "1", "0.5", "2", "--length_target_tokens", "2", "--learning_rate",
                "3e-3", "--lora_dropout", "0.1", "--report_to", "none", "--seed", "1", "--disable_tqdm", "True"]

    crashed = tmp_path / "crashed"
    expected, resumed = crash_then_resume(grpo_args, tmp_path, crashed, 4, "reward")
    full = {e["step"]: e for e in json.loads((tmp_path / "full" / "trainer_state.json").read_text())["log_history"]
            if "reward" in e}
    assert sorted(full) == list(range(1, 7))
    for e in full.values():  # each reward logged on its own; the logged reward is their weighted sum
        parts = e["rewards/accuracy/mean"] + 0.5 * e["rewards/format/mean"] + 2 * e["rewards/length/mean"]
        assert abs(e["reward"] - parts) < 1e-5, e
    # replies learn to end early: the length reward rises (seed 1: 0.08 at step 1, >= 0.9 from step 3)
    assert full[1]["rewards/length/mean"] < 0.3 and min(full[s]["rewards/length/mean"] for s in (5, 6)) > 0.8
    assert any(full[s]["loss"] != 0 for s in (5, 6))  # updates after the crash point really happen
    resumed_log = {e["step"]: e for e in json.loads((crashed / "trainer_state.json").read_text())["log_history"]
                   if "reward" in e}
    for step in (5, 6):  # sampling RNG, adapter and optimizer restored: the same completions, rewards and loss
        for key in ("reward", "rewards/length/mean", "completions/mean_length", "num_tokens", "loss"):
            assert abs(resumed_log[step][key] - full[step][key]) <= 1e-5 * max(1.0, abs(full[step][key])), (step, key)
    assert (crashed / "adapter_model.safetensors").is_file()
    assert json.loads((crashed / "medtrain_chat_format.json").read_text())["kind"] == "tokenizer"
    assert imread(crashed / "training_curves.png").size > 0  # reward/KL curves, drawn at the end
    # the adapter merges into the base like every other stage's
    import merge_peft_adapter

    merge_peft_adapter.main(["--base_model", str(model), "--lora_model", str(crashed),
                             "--output_dir", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_grpo_sampler_draws_each_epochs_order_from_seed_and_epoch():
    """A run resumed at an epoch boundary gets that epoch's prompt order, not a replay of the first epoch's."""
    from trl.trainer.utils import RepeatSampler

    from medtrain.grpo import epoch_seeded_sampler

    data = list(range(12))

    def orders(first_epoch):  # each epoch's order from a sampler that starts (afresh) at first_epoch
        sampler = epoch_seeded_sampler(RepeatSampler(data, mini_repeat_count=2, batch_size=3, seed=7))
        result = {}
        for epoch in range(first_epoch, 3):
            sampler.set_epoch(epoch)  # what the Trainer does (through accelerate) before each epoch
            result[epoch] = list(sampler)
        return result

    full, resumed = orders(0), orders(2)
    assert resumed[2] == full[2] and len({tuple(o) for o in full.values()}) == 3
    assert full[0] == list(RepeatSampler(data, mini_repeat_count=2, batch_size=3, seed=7))  # epoch 0 is TRL's order
    for kept in (RepeatSampler(data, 2, 3, seed=None), RepeatSampler(data, 2, 3, shuffle=False, seed=7)):
        assert type(epoch_seeded_sampler(kept)) is RepeatSampler  # nothing to make reproducible: left as TRL's


def test_sample_questions_load():
    from conftest import ROOT

    rows = load_questions([str(ROOT / "data" / "grpo" / "medical_questions.jsonl")])
    kinds = [r["answer_type"] for r in rows]
    assert len(rows) == 16 and kinds.count("choice") == 7 and kinds.count("math") == 7 and kinds.count("text") == 2

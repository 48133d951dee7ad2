"""The evaluation stage: benchmark readers and their errors, lm-eval numbers checked by hand and against the plain
lm_eval CLI, LoRA unmerged == merged, the chat format's exact prompt, results layout, contamination."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import MERGE_ATOL, ROOT, build_model, build_tokenizer, requires_shared, run_script, shared_path

from medtrain.benchmarks import load_benchmark
from medtrain.contamination import TrainingIndex, tokens
from medtrain.errors import ConfigError, DataError

ANATOMY_TEST = """,Question,A,B,C,D,Answer
0,发烧时应该多喝什么,水,酒,咖啡,可乐,A
1,"高血压患者
应少吃什么",糖,盐,菜,果,B
2,人体最大的器官是,肝,肺,皮肤,心,C
"""
ANATOMY_DEV = """,Question,A,B,C,D,Answer
0,胰岛素由哪个器官分泌,肝,胃,脾,胰腺,D
"""
MC_JSONL = [
    {"question": "Which organ pumps blood?", "options": ["Lung", "Heart", "Liver"], "answer": "B", "subject": "cardio"},
    {"question": "What is the normal resting heart rate in beats per minute for an adult at rest in the clinic?",
     "A": "60-100", "B": "150-200", "answer": 0, "subject": "cardio"},
]
PQAL = {str(pmid): {"QUESTION": f"Does drug {pmid} help?", "CONTEXTS": ["Background.", "Results."],
                    "final_decision": label, "LONG_ANSWER": "..."}
        for pmid, label in zip(range(101, 105), ["yes", "no", "maybe", "yes"])}
CARDIO_DEV = {"question": "Where is bile made?", "options": ["Liver", "Lung"], "answer": "A", "subject": "cardio"}
# The second cardio question, with other spacing/case/punctuation and full-width characters, inside a training text
PLANTED = ("Note: WHAT is the normal resting heart-rate, in beats per minute, for an adult at rest in the ＣＬＩＮＩＣ? "
           "Usually 60 to 100.")


def write_benchmark(root: Path, dev: bool = True) -> Path:
    (root / "test").mkdir(parents=True)
    (root / "test" / "anatomy.csv").write_text(ANATOMY_TEST, encoding="utf-8")
    if dev:
        (root / "dev").mkdir()
        (root / "dev" / "anatomy.csv").write_text(ANATOMY_DEV, encoding="utf-8")
        (root / "dev" / "mine.jsonl").write_text(json.dumps(CARDIO_DEV) + "\n", encoding="utf-8")
    with open(root / "mine.jsonl", "w", encoding="utf-8") as fh:
        for row in MC_JSONL:
            fh.write(json.dumps(row) + "\n")
    (root / "pubmed").mkdir()
    (root / "pubmed" / "pqal.json").write_text(json.dumps(PQAL, indent=1), encoding="utf-8")
    (root / "pubmed" / "truth.json").write_text(json.dumps({"104": "yes", "102": "no"}), encoding="utf-8")
    return root


def evaluate(model: Path, bench: Path, out: Path, *extra: str) -> dict:
    import eval_benchmarks

    eval_benchmarks.main(["--model_name_or_path", str(model), "--benchmark_dir", str(bench), "--output_dir", str(out),
                          "--batch_size", "4", *extra])
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write_benchmark(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_model_dir, bench) -> Path:
    """1-shot run on both subjects with samples and a contamination source (shared by several tests)."""
    out = tmp_path_factory.mktemp("eval") / "out"
    train = tmp_path_factory.mktemp("train")
    (train / "sft.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": PLANTED},
                                                                   {"from": "gpt", "value": "ok"}]}) + "\n")
    evaluate(tiny_model_dir, bench, out, "--num_fewshot", "1", "--log_samples", "--train_file_dir", str(train))
    return out


# --------------------------------------------------------------------------------------------------------------
# Numbers


def test_choice_loglikelihoods_recomputed_by_hand(eval_run, tiny_model_dir):
    """The exact 1-shot prompt, and each choice's log-likelihood = sum of log-softmax over its tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = [r for r in samples(eval_run) if r["subject"] == "anatomy"][1]
    prompt = ("以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n"
              "胰岛素由哪个器官分泌\nA. 肝\nB. 胃\nC. 脾\nD. 胰腺\n答案： D\n\n"
              "高血压患者\n应少吃什么\nA. 糖\nB. 盐\nC. 菜\nD. 果\n答案：")
    assert row["prompt"] == prompt
    assert (row["id"], row["answer"]) == ("test/anatomy.csv:3", "B")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    by_hand = []
    for letter in "ABCD":
        context = tokenizer.encode(prompt)
        whole = tokenizer.encode(prompt + " " + letter)
        assert whole[: len(context)] == context
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        by_hand.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
    assert row["loglikelihoods"] == pytest.approx(by_hand, abs=1e-4)
    assert row["model_choice"] == "ABCD"[max(range(4), key=by_hand.__getitem__)]
    assert row["correct"] == (row["model_choice"] == "B")


def test_pubmedqa_prompt_and_word_choices(eval_run):
    """lm-eval's PubMedQA prompt; the choices are the words yes/no/maybe; 1-shot from the non-test PMIDs."""
    rows = [r for r in samples(eval_run) if r["subject"] == "pubmedqa"]
    assert [(r["id"], r["answer"]) for r in rows] == [("102", "no"), ("104", "yes")]
    assert rows[0]["prompt"] == ("Abstract: Background. Results.\nQuestion: Does drug 101 help?\nAnswer: yes\n\n"
                                 "Abstract: Background. Results.\nQuestion: Does drug 102 help?\nAnswer:")
    assert rows[0]["model_choice"] == ["yes", "no", "maybe"][max(range(3), key=rows[0]["loglikelihoods"].__getitem__)]


def test_project_benchmark_is_not_in_the_project_training_data():
    from medtrain.contamination import check_questions

    index = TrainingIndex.from_paths([str(ROOT / "data" / d) for d in ("pretrain", "sft", "sft_openai", "alpaca",
                                                                       "reward")])
    for subject in load_benchmark(str(ROOT / "data" / "eval")):
        assert check_questions(index, [q.to_json(True) for q in subject.test + subject.dev]) == [], subject.name


def test_results_layout(eval_run):
    results = json.loads((eval_run / "results.json").read_text(encoding="utf-8"))
    rows = [r for r in samples(eval_run) if r["subject"] == "anatomy"]
    anatomy = results["subjects"]["anatomy"]
    assert list(results["subjects"]) == ["anatomy", "cardio", "pubmedqa"]
    assert anatomy["n"] == 3 and anatomy["task"] == "medtrain_anatomy"
    acc = sum(r["correct"] for r in rows) / 3
    assert anatomy["acc"] == pytest.approx(acc)
    assert anatomy["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 2))  # sample variance, n - 1
    cardio = results["subjects"]["cardio"]
    assert cardio["n"] == 2
    pubmedqa = results["subjects"]["pubmedqa"]
    accs = [acc, cardio["acc"], pubmedqa["acc"]]
    assert results["macro_average"]["acc"] == pytest.approx(sum(accs) / 3)
    assert results["micro_average"]["acc"] == pytest.approx((3 * accs[0] + 2 * accs[1] + 2 * accs[2]) / 7)
    assert results["macro_average"]["acc_stderr"] == pytest.approx(
        math.sqrt(sum(r["acc_stderr"] ** 2 for r in (anatomy, cardio, pubmedqa))) / 3)
    assert results["micro_average"]["n"] == results["macro_average"]["n"] == 7
    assert results["num_fewshot"] == 1 and results["chat_format"] is None
    table = (eval_run / "results.md").read_text(encoding="utf-8").splitlines()
    assert table[0] == "| subject | n | acc | acc stderr | acc_norm | acc_norm stderr | contaminated |"
    assert table[2].startswith(f"| anatomy | 3 | {acc:.4f} | {anatomy['acc_stderr']:.4f} |")
    assert [line.split(" | ")[0] for line in table[3:]] == ["| cardio", "| pubmedqa", "| **macro average**",
                                                             "| **micro average**"]
    raw = json.loads((eval_run / "lm_eval_results.json").read_text(encoding="utf-8"))
    assert raw["results"]["medtrain_anatomy"]["acc,none"] == anatomy["acc"]
    assert raw["n-shot"]["medtrain_anatomy"] == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(eval_run / "logs")).Reload()
    assert events.Scalars("eval/anatomy/acc")[0].value == pytest.approx(acc)
    assert "eval/micro_average/acc_norm" in events.Tags()["scalars"]


def test_single_question_subject_has_no_stderr():
    """lm-eval reports stderr "N/A" for one question: results.json says null, the table "-", averages stay numbers."""
    from types import SimpleNamespace

    from medtrain.evaluation import markdown_table, summarize

    raw = {"results": {"medtrain_a": {"acc,none": 1.0, "acc_stderr,none": "N/A", "acc_norm,none": 1.0,
                                      "acc_norm_stderr,none": "N/A"},
                       "medtrain_b": {"acc,none": 0.5, "acc_stderr,none": 0.5, "acc_norm,none": 0.5,
                                      "acc_norm_stderr,none": 0.5}},
           "samples": {"medtrain_a": [{"acc": 1.0, "acc_norm": 1.0}],
                       "medtrain_b": [{"acc": 1.0, "acc_norm": 1.0}, {"acc": 0.0, "acc_norm": 0.0}]}}
    subjects = [SimpleNamespace(name="a", task="medtrain_a"), SimpleNamespace(name="b", task="medtrain_b")]
    summary = summarize(raw, subjects, None)
    assert summary["subjects"]["a"]["acc_stderr"] is None and summary["macro_average"]["acc_stderr"] is None
    assert summary["micro_average"] == {"n": 3, "acc": pytest.approx(2 / 3), "acc_stderr": pytest.approx(1 / 3),
                                        "acc_norm": pytest.approx(2 / 3), "acc_norm_stderr": pytest.approx(1 / 3)}
    assert markdown_table(summary).splitlines()[2] == "| a | 1 | 1.0000 | - | 1.0000 | - |"


def test_plain_lm_eval_cli_gives_identical_numbers(eval_run, tiny_model_dir, tmp_path):
    """OUT/reproduce.sh (the plain `lm_eval` CLI on OUT/tasks) scores every question exactly as our script did."""
    command = (eval_run / "reproduce.sh").read_text(encoding="utf-8").splitlines()[-1]
    assert command.startswith(
        f"lm_eval --model hf --model_args pretrained={tiny_model_dir},dtype=float32 --include_path {eval_run}/tasks "
        "--tasks medtrain_anatomy,medtrain_cardio,medtrain_pubmedqa --num_fewshot 1")
    lm_eval = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run(f"{lm_eval}{command[len('lm_eval'):]} --log_samples --output_path {tmp_path}/cli",
                          shell=True, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (tmp_path / "cli").rglob("results_*.json")
    cli = json.loads(result_file.read_text(encoding="utf-8"))["results"]
    ours = json.loads((eval_run / "lm_eval_results.json").read_text(encoding="utf-8"))["results"]
    cli_loglik = []
    for task in ("medtrain_anatomy", "medtrain_cardio", "medtrain_pubmedqa"):
        for metric in ("acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"):
            assert cli[task][metric] == ours[task][metric]
        (sample_file,) = (tmp_path / "cli").rglob(f"samples_{task}_*.jsonl")
        cli_loglik += [[float(r[0]) for r in json.loads(line)["filtered_resps"]]
                       for line in sample_file.read_text(encoding="utf-8").splitlines()]
    assert cli_loglik == [row["loglikelihoods"] for row in samples(eval_run)]  # bit for bit


def test_lora_adapter_unmerged_equals_merged_model(tmp_path, tiny_model_dir, bench, eval_run):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))  # random B: the adapter changes outputs
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    peft_model.save_pretrained(adapter)
    peft_model.merge_and_unload().save_pretrained(merged)
    shutil.copy(tiny_model_dir / "tokenizer.json", merged)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", merged)

    runs = {"base": [row["loglikelihoods"] for row in samples(eval_run)]}
    for name, flags in {"lora": [str(tiny_model_dir), "--lora_model", str(adapter)], "merged": [str(merged)]}.items():
        evaluate(Path(flags[0]), bench, tmp_path / f"eval-{name}", *flags[1:], "--num_fewshot", "1", "--log_samples")
        runs[name] = [row["loglikelihoods"] for row in samples(tmp_path / f"eval-{name}")]
    lora, merged_ll, base_ll = (torch.tensor(sum(runs[k], [])) for k in ("lora", "merged", "base"))
    assert torch.allclose(lora, merged_ll, atol=MERGE_ATOL, rtol=0)
    assert (lora - base_ll).abs().max() > 100 * MERGE_ATOL  # the adapter was really applied
    results = json.loads((tmp_path / "eval-lora" / "results.json").read_text(encoding="utf-8"))
    assert results["lora_model"] == str(adapter) and ",peft=" in results["reproduce"]


def test_recorded_chat_format_renders_the_prompt(tmp_path, bench):
    """--chat_template True renders with the format recorded at training time (here vicuna and its system text),
    k-shot as turns; the recorded system text goes before lm-eval's task description in the system slot."""
    model_dir = tmp_path / "model"
    build_model(model_dir, build_tokenizer(model_dir))
    (model_dir / "medtrain_chat_format.json").write_text(
        json.dumps({"kind": "template", "template_name": "vicuna", "system_prompt": "Be careful."}), encoding="utf-8")
    results = evaluate(model_dir, bench, tmp_path / "out", "--chat_template", "True",
                       "--num_fewshot", "1", "--tasks", "anatomy", "--log_samples")
    assert results["chat_format"] == {"kind": "template", "template_name": "vicuna", "system_prompt": "Be careful."}
    assert results["reproduce"] is None  # the plain CLI has no medtrain templates
    assert samples(tmp_path / "out")[0]["prompt"] == (
        "Be careful.\n\n以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n USER: "
        "胰岛素由哪个器官分泌\nA. 肝\nB. 胃\nC. 脾\nD. 胰腺\n答案： ASSISTANT: D</s>USER: "
        "发烧时应该多喝什么\nA. 水\nB. 酒\nC. 咖啡\nD. 可乐\n答案： ASSISTANT:"
    )


def test_tokenizer_chat_format_renders_as_lm_eval_does(tiny_chat_model_dir):
    """With the tokenizer's own template our renderer equals HFLM's (so `lm_eval --apply_chat_template` reproduces)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtrain.chat_format import TokenizerChatFormat
    from medtrain.evaluation import build_lm

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    ours = build_lm(model, tokenizer, 1, TokenizerChatFormat(tokenizer))
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, backend="causal")
    history = [{"role": "system", "content": "Answer.\n\n"}, {"role": "user", "content": "Q1\nA. x\nAnswer:"},
               {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2\nA. y\nAnswer:"}]
    rendered = ours.apply_chat_template(history)
    assert rendered == theirs.apply_chat_template(history) == (
        "<|im_start|>system\nAnswer.\n\n<|im_end|>\n<|im_start|>user\nQ1\nA. x\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nQ2\nA. y\nAnswer:<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------------------------
# Contamination


def test_normalisation_tokens():
    assert tokens("Ｈｅｌｌｏ, World! 高血压患者abc 12.5mg") == ["hello", "world", "高", "血", "压", "患", "者", "abc",
                                                             "12", "5mg"]


def test_contamination_planted_overlap(tmp_path):
    index = TrainingIndex([PLANTED, "发烧时应该多喝什么"])
    questions = load_benchmark(str(write_benchmark(tmp_path / "b")))
    flagged = {s.name: [q.id for q in s.test if index.question_overlaps(q.question, q.context, q.choices)]
               for s in questions}
    # the long English question shares 13-grams despite case/punctuation/full-width; the short Chinese question
    # (9 characters) occurs whole; "Which organ pumps blood?" does not occur
    assert flagged == {"anatomy": ["test/anatomy.csv:2"], "cardio": ["mine.jsonl:2"], "pubmedqa": []}
    twelve = " ".join(tokens(MC_JSONL[1]["question"])[:12])
    assert not TrainingIndex([twelve]).overlaps(MC_JSONL[1]["question"])  # 12 shared tokens are not 13
    assert TrainingIndex(["x " + " ".join(tokens(MC_JSONL[1]["question"])[3:16])]).overlaps(MC_JSONL[1]["question"])


def test_contamination_reported_per_subject(eval_run):
    results = json.loads((eval_run / "results.json").read_text(encoding="utf-8"))
    assert results["subjects"]["anatomy"]["contaminated"] == 0
    assert results["subjects"]["cardio"]["contaminated"] == 1
    assert results["subjects"]["cardio"]["contaminated_ids"] == ["mine.jsonl:2"]
    assert results["micro_average"]["contaminated"] == 1
    assert (eval_run / "results.md").read_text(encoding="utf-8").splitlines()[3].endswith(" | 1 |")


# --------------------------------------------------------------------------------------------------------------
# Layouts and bad input


def test_pubmedqa_layout_with_ground_truth_split(tmp_path):
    (tmp_path / "pqal.json").write_text(json.dumps(PQAL, indent=1), encoding="utf-8")
    (tmp_path / "truth.json").write_text(json.dumps({"104": "yes", "102": "no"}), encoding="utf-8")
    (subject,) = load_benchmark(str(tmp_path))
    assert (subject.name, subject.kind) == ("pubmedqa", "pubmedqa")
    # in the PQA-L file's order, not the ground-truth file's (the published one is sorted by label)
    assert [(q.id, q.answer, q.context) for q in subject.test] == [("102", 1, "Background. Results."),
                                                                   ("104", 0, "Background. Results.")]
    assert [q.id for q in subject.dev] == ["101", "103"]
    (tmp_path / "truth.json").write_text(json.dumps({"104": "no"}), encoding="utf-8")
    with pytest.raises(DataError, match=r"pqal\.json:\d+: 104\.final_decision: the ground-truth file says 'no'"):
        load_benchmark(str(tmp_path))


@requires_shared
def test_shared_benchmarks_read():
    subjects = load_benchmark(str(shared_path("data", "eval", "cmmlu_medical")))
    assert {s.name: (len(s.test), len(s.dev)) for s in subjects} == {
        "anatomy": (148, 5), "clinical_knowledge": (237, 5), "college_medicine": (273, 5),
        "professional_medicine": (376, 5), "traditional_chinese_medicine": (185, 5)}


def test_project_benchmark_data():
    subjects = load_benchmark(str(ROOT / "data" / "eval"))
    assert {s.name: (len(s.test), len(s.dev), s.chinese) for s in subjects} == {
        "medicine_en": (18, 5, False), "medicine_zh": (18, 5, True)}


BAD = [
    # (file, content, flags, expected error after the file path)
    ("test/anatomy.csv", ",Question,A,B,C,D\n0,q,a,b,c,d\n", [],
     ":1: header: missing column 'Answer' (the CMMLU layout is ,Question,A,B,C,D,Answer; found ,Question,A,B,C,D)"),
    ("test/anatomy.csv", ",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n1,\"two\nlines\",a,b,c,d,E\n", [],
     ":3: Answer: answer 'E' is not one of the options A, B, C, D"),
    ("test/anatomy.csv", "", [], ": file is empty (a CMMLU-layout CSV needs the header ,Question,A,B,C,D,Answer)"),
    ("test/anatomy.csv", ",Question,A,B,C,D,Answer\n", [], ": no questions: the file has a header but no rows"),
    ("test/anatomy.csv", ",Question,A,B,C,D,Answer\n0,q,a,b,c,d\n", [], ":2: 6 fields, the header has 7 (an "
     "unquoted comma or quote in a field?)"),
    ("mine.jsonl", '{"question": "q", "options": ["a", "b", "c"], "answer": "D"}\n', [],
     ":1: answer: 'D' is not one of the options A, B, C (a letter, or a 0-based index below 3)"),
    ("mine.jsonl", '{"options": ["a", "b"], "answer": 0}\n', [],
     ":1: question: missing or empty (the generic layout needs question, options or A..E, answer)"),
    ("mine.jsonl", "\n\n", [], ": file is empty"),
    ("dev/anatomy.csv", ANATOMY_DEV, ["--num_fewshot", "2"],
     ":2: subject 'anatomy' has 1 dev question(s), --num_fewshot 2 needs 2: add worked examples under dev/ "
     "(or lower --num_fewshot)"),
]


@pytest.mark.parametrize("name,content,flags,expected", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, tiny_model_dir, name, content, flags, expected):
    bench = tmp_path / "bench"
    (bench / "test").mkdir(parents=True)
    (bench / "test" / "anatomy.csv").write_text(ANATOMY_TEST, encoding="utf-8")
    (bench / name).parent.mkdir(parents=True, exist_ok=True)
    (bench / name).write_text(content, encoding="utf-8")
    import eval_benchmarks

    with pytest.raises(DataError) as err:
        eval_benchmarks.main(["--model_name_or_path", str(tiny_model_dir), "--benchmark_dir", str(bench),
                              "--output_dir", str(tmp_path / "out"), *flags])
    assert str(err.value) == str(bench / name) + expected
    assert not (tmp_path / "out").exists()


def test_bad_input_exit_status_2_one_line(tmp_path, tiny_model_dir):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "anatomy.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,F\n", encoding="utf-8")
    proc = run_script("eval_benchmarks.py", "--model_name_or_path", str(tiny_model_dir), "--benchmark_dir",
                      str(bench), "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {bench}/anatomy.csv:2: Answer: answer 'F' is not one of "
                                                    "the options A, B, C, D")
    assert not (tmp_path / "out").exists()


def test_flag_errors(tmp_path, tiny_model_dir, bench):
    import eval_benchmarks

    common = ["--model_name_or_path", str(tiny_model_dir), "--benchmark_dir", str(bench)]
    message = "--tasks: no subject matches nope; the benchmark dir has anatomy, cardio, pubmedqa"
    with pytest.raises(ConfigError, match=message):
        eval_benchmarks.main(common + ["--output_dir", str(tmp_path / "o"), "--tasks", "nope"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not empty"):
        eval_benchmarks.main(common + ["--output_dir", str(tmp_path / "full")])
    assert (tmp_path / "full" / "results.json").read_text() == "{}"
    # a shared model flag that only the chat prompt uses (checked across the two dataclasses, before anything loads)
    with pytest.raises(ConfigError, match="--template_name/--system_prompt shape the chat prompt: add --chat_template"):
        eval_benchmarks.main(common + ["--output_dir", str(tmp_path / "t"), "--template_name", "chatml"])
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
@requires_shared
def test_smollm2_on_real_cmmlu(tmp_path):
    model = ROOT / "models" / "SmolLM2-135M-Instruct"
    if not (model / "config.json").is_file():
        pytest.skip("models/SmolLM2-135M-Instruct is absent (python prepare_model.py)")
    results = evaluate(model, shared_path("data", "eval", "cmmlu_medical"), tmp_path / "out", "--limit", "5",
                       "--num_fewshot", "5", "--tasks", "anatomy,clinical_knowledge")
    assert results["micro_average"]["n"] == 10
    assert 0.0 <= results["micro_average"]["acc"] <= 1.0

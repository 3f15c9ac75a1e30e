"""Shared benchmark plumbing: predictions file, reasoning stripping, the OpenAI-compatible judge against a loopback
fake server, the `storms score` / `storms data check` handlers in-process, and Sample conversion."""

from __future__ import annotations

import argparse
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from storms_dist.data.manifest import read_manifest, write_manifest
from storms_dist.data.video_io import encoder_available, write_video
from storms_dist.eval.benchmarks import (
    BENCHMARKS,
    BenchItem,
    BenchmarkDataError,
    JudgeError,
    OpenAIJudge,
    read_predictions,
    strip_reasoning,
)
from storms_dist.eval.benchmarks.cli import add_data_parser, add_score_parser
from storms_dist.eval.benchmarks.judge import Judge, chat_completions_url

needs_h264 = pytest.mark.skipif(not encoder_available("h264"), reason="libx264 is not in this PyAV build")


# ------------------------------------------------------------------------------------------ fixtures


class FakeChatServer:
    """An OpenAI-compatible /v1/chat/completions endpoint on loopback. ``respond(body) -> (status, json)``."""

    def __init__(self, respond: Callable[[dict], tuple[int, dict]]) -> None:
        self.respond = respond
        self.requests: list[tuple[str, dict[str, str], dict]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append((self.path, dict(self.headers), body))
                status, payload = owner.respond(body) if self.path == "/v1/chat/completions" else (404, {})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


def chat_reply(content: str) -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                         "content": content}}]}


@pytest.fixture()
def fake_server() -> Iterator[Callable[[Callable[[dict], tuple[int, dict]]], FakeChatServer]]:
    servers: list[FakeChatServer] = []

    def start(respond: Callable[[dict], tuple[int, dict]]) -> FakeChatServer:
        server = FakeChatServer(respond)
        server.thread.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


MMVU_RECORDS = [
    {"id": "validation_0", "video": "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/Art/0.mp4",
     "question_type": "open-ended", "metadata": {"subject": "Art"}, "question": "Which technique is shown?",
     "choices": {k: "" for k in "ABCDE"}, "answer": "Dolly Zoom"},
    {"id": "validation_1", "video": "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/Law/2.mp4",
     "question_type": "open-ended", "metadata": {"subject": "Law"}, "question": "Which doctrine applies?",
     "choices": {k: "" for k in "ABCDE"}, "answer": "force majeure"},
    {"id": "validation_2", "video": "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/Chemistry/0.mp4",
     "question_type": "multiple-choice", "metadata": {"subject": "Chemistry"}, "question": "How many grams?",
     "choices": {"A": "10.0", "B": "5.0", "C": "12.0", "D": "15.0", "E": "20.0"}, "answer": "A"},
]

MVBENCH_TASK = [
    {"video": "video_1.mp4", "question": "Is there a cube?", "candidates": ["yes", "no"], "answer": "yes"},
    {"video": "video_2.mp4", "question": "Is there a cone?", "candidates": ["yes", "no"], "answer": "no"},
    {"video": "video_3.mp4", "question": "How many spheres?", "candidates": ["1", "2", "3"], "answer": "2"},
]


def write_mmvu(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "validation.json").write_text(json.dumps(MMVU_RECORDS), encoding="utf-8")
    return root


def write_mvbench(root: Path) -> Path:
    (root / "json").mkdir(parents=True)
    (root / "json" / "object_existence.json").write_text(json.dumps(MVBENCH_TASK), encoding="utf-8")
    return root


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_cli(argv: list[str]) -> int:
    """What the host `storms` CLI does with these two parsers: parse, then call the handler."""
    parser = argparse.ArgumentParser(prog="storms")
    sub = parser.add_subparsers(dest="command", required=True)
    add_score_parser(sub)
    add_data_parser(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


# ------------------------------------------------------------------------------------- predictions


def test_read_predictions_and_one_line_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"uid": "a/0", "prediction": "B", "latency_ms": 3}\n\n{"uid": "a/1", "prediction": ""}\n',
                    encoding="utf-8")
    assert read_predictions(good) == {"a/0": "B", "a/1": ""}
    cases = {
        '{"uid": "a/0", "prediction": "B"}\n{"uid": "a/0", "prediction": "C"}\n':
            r"bad\.jsonl:2: uid: expected unique uids; 'a/0' already on line 1",
        '{"uid": "a/0", "prediction": null}\n': r"bad\.jsonl:1: prediction: expected the raw model text as a string",
        '{"prediction": "B"}\n': r"bad\.jsonl:1: uid: expected a non-empty string",
        '{"uid": "a/0", "prediction": "B"\n': r"bad\.jsonl:1: json: expected one JSON object per line",
        '["a/0", "B"]\n': r"bad\.jsonl:1: line: expected a JSON object",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(BenchmarkDataError, match=message) as error:
            read_predictions(bad)
        assert "\n" not in str(error.value)


def test_strip_reasoning_like_lmms_eval() -> None:
    assert strip_reasoning("<think>it is A</think>\n B ") == "B"
    assert strip_reasoning("<analysis>x</analysis>C<think>y</think>") == "C"
    assert strip_reasoning("prefilled reasoning...</think> D") == "D"  # template prefilled <think>
    assert strip_reasoning("<think>never closed A") == "<think>never closed A"
    assert strip_reasoning("  plain  ") == "plain"


def test_bench_item_validates_kind_and_letter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind: expected one of"):
        BenchItem(uid="u", benchmark="b", video=tmp_path, question="q", options=(), answer="a", answer_letter=None,
                  kind="essay", prompt="p")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="answer_letter: expected a letter indexing 2 options"):
        BenchItem(uid="u", benchmark="b", video=tmp_path, question="q", options=("x", "y"), answer="C",
                  answer_letter="C", kind="multiple_choice", prompt="p")


# ------------------------------------------------------------------------------------------- judge


def test_openai_judge_request_and_reply(fake_server, monkeypatch: pytest.MonkeyPatch) -> None:
    server = fake_server(lambda body: (200, chat_reply(f"  echo {body['messages'][-1]['content']}  ")))
    monkeypatch.setenv("STORMS_TEST_JUDGE_KEY", "sk-test")
    judge = OpenAIJudge(base_url=server.base_url, model="judge-1", api_key_env="STORMS_TEST_JUDGE_KEY")
    assert isinstance(judge, Judge)
    reply = judge.complete([{"role": "user", "content": "hi"}], max_tokens=7, temperature=0.0)
    assert reply == "echo hi"
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body == {"model": "judge-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7,
                    "temperature": 0.0}
    monkeypatch.delenv("STORMS_TEST_JUDGE_KEY")
    judge.complete([{"role": "user", "content": "again"}], max_tokens=7, temperature=0.0)
    assert "Authorization" not in server.requests[1][1]  # no key: no header (local servers)


def test_openai_judge_retries_server_errors_not_client_errors(fake_server) -> None:
    statuses = iter([503, 500, 200])
    server = fake_server(lambda body: (next(statuses), chat_reply("1")))
    judge = OpenAIJudge(base_url=server.base_url + "/chat/completions", model="m", retry_backoff_s=0.0)
    assert judge.complete([{"role": "user", "content": "q"}], max_tokens=1, temperature=0.0) == "1"
    assert len(server.requests) == 3

    bad_request = fake_server(lambda body: (400, {"error": {"message": "model  not\nfound"}}))
    judge = OpenAIJudge(base_url=bad_request.base_url, model="m", retry_backoff_s=0.0)
    with pytest.raises(JudgeError, match=r"HTTP 400 model not found$"):
        judge.complete([{"role": "user", "content": "q"}], max_tokens=1, temperature=0.0)
    assert len(bad_request.requests) == 1

    unauthorized = fake_server(lambda body: (401, {"error": {"message": "bad key"}}))
    with pytest.raises(JudgeError, match=r"is \$OPENAI_API_KEY set\?"):
        OpenAIJudge(base_url=unauthorized.base_url, model="m").complete([], max_tokens=1, temperature=0.0)

    malformed = fake_server(lambda body: (200, {"choices": []}))
    with pytest.raises(JudgeError, match="expected choices\\[0\\].message.content"):
        OpenAIJudge(base_url=malformed.base_url, model="m").complete([], max_tokens=1, temperature=0.0)


def test_openai_judge_gives_up_on_a_closed_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = OpenAIJudge(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, retry_backoff_s=0.0,
                        timeout_s=2.0)
    with pytest.raises(JudgeError, match="gave up after 2 attempts"):
        judge.complete([{"role": "user", "content": "q"}], max_tokens=1, temperature=0.0)
    assert chat_completions_url("https://api.openai.com/v1/") == "https://api.openai.com/v1/chat/completions"
    with pytest.raises(ValueError, match="base_url: expected an http"):
        OpenAIJudge(base_url="api.openai.com", model="m")


# --------------------------------------------------------------------------------------------- CLI


def test_cli_score_without_judge_writes_out_and_details(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_mmvu(tmp_path / "mmvu")
    predictions = write_jsonl(tmp_path / "pred.jsonl", [
        {"uid": "validation_0", "prediction": "a dolly zoom"}, {"uid": "validation_2", "prediction": "B"},
        {"uid": "validation_9", "prediction": "A"}])
    out, details = tmp_path / "out" / "summary.json", tmp_path / "out" / "details.jsonl"
    code = run_cli(["score", "--benchmark", "mmvu", "--data-root", str(root), "--predictions", str(predictions),
                    "--out", str(out), "--details", str(details)])
    captured = capsys.readouterr()
    assert code == 0
    printed = json.loads(captured.out)
    assert printed == json.loads(out.read_text())
    assert (printed["benchmark"], printed["num_questions"], printed["accuracy"]) == ("mmvu", 1, 0.0)
    assert printed["judge_required"]["open-ended"]["rule_correct"] == 1
    assert "1 prediction uids are not mmvu questions" in captured.err
    lines = [json.loads(line) for line in details.read_text().splitlines()]
    assert [(d["uid"], d["method"]) for d in lines] == [("validation_0", "rule"), ("validation_1", "needs_judge"),
                                                         ("validation_2", "rule")]


def test_cli_score_with_fake_judge_server(tmp_path: Path, fake_server, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    server = fake_server(lambda body: (200, chat_reply(
        "1" if "Model Prediction: an act of god clause" in body["messages"][0]["content"] else "0")))
    monkeypatch.setenv("STORMS_TEST_JUDGE_KEY", "sk-cli")
    root = write_mmvu(tmp_path / "mmvu")
    predictions = write_jsonl(tmp_path / "pred.jsonl", [
        {"uid": "validation_0", "prediction": "tracking shot"},
        {"uid": "validation_1", "prediction": "<think>contract law</think>an act of god clause"},
        {"uid": "validation_2", "prediction": "A"}])
    code = run_cli(["score", "--benchmark", "mmvu", "--data-root", str(root), "--predictions", str(predictions),
                    "--judge-url", server.base_url, "--judge-model", "gpt-4o-2024-11-20",
                    "--judge-api-key-env", "STORMS_TEST_JUDGE_KEY", "--judge-workers", "2"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["num_questions"] == 3 and summary["accuracy"] == pytest.approx(200 / 3)
    assert summary["breakdown"]["question_type"] == pytest.approx({"open-ended": 50.0, "multiple-choice": 100.0})
    assert summary["counts"]["judged"] == 2 and "judge_required" not in summary
    assert len(server.requests) == 2
    assert {r[2]["model"] for r in server.requests} == {"gpt-4o-2024-11-20"}
    assert {r[1]["Authorization"] for r in server.requests} == {"Bearer sk-cli"}


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_mmvu(tmp_path / "mmvu")
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text('{"uid": "validation_0"}\n', encoding="utf-8")
    assert run_cli(["score", "--benchmark", "mmvu", "--data-root", str(root), "--predictions", str(predictions)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("storms score: error: ") and "pred.jsonl:1: prediction:" in err and err.count("\n") == 1
    assert run_cli(["score", "--benchmark", "mmvu", "--data-root", str(root), "--predictions", str(predictions),
                    "--judge-url", "http://127.0.0.1:9/v1"]) == 2
    assert "--judge-url and --judge-model: expected both or neither" in capsys.readouterr().err
    assert run_cli(["data", "check", "--benchmark", "mvbench", "--data-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("storms data check: error: ") and "data root: expected a directory" in err


@needs_h264
def test_cli_data_check_lists_missing_and_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_mvbench(tmp_path / "mvbench")
    folder = root / "clevrer" / "video_validation"
    folder.mkdir(parents=True)
    write_video(folder / "video_1.mp4", np.zeros((4, 16, 16, 3), np.uint8), 4.0, "h264")
    (folder / "video_2.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 512, np.uint8).tobytes())
    report_path = tmp_path / "check.json"
    code = run_cli(["data", "check", "--benchmark", "mvbench", "--data-root", str(root), "--out", str(report_path)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert [line for line in lines if line.startswith("missing: ")] == [
        f"missing: {folder.resolve() / 'video_3.mp4'} (1 question, e.g. object_existence/2)"]
    unreadable = [line for line in lines if line.startswith("unreadable: ")]
    assert len(unreadable) == 1 and str(folder.resolve() / "video_2.mp4") in unreadable[0]
    assert lines[-1] == "1 missing, 1 unreadable of 3 videos"
    report = json.loads(report_path.read_text())
    assert report["ok"] is False and report["missing"][0]["example_uid"] == "object_existence/2"

    write_video(folder / "video_2.mp4", np.zeros((4, 16, 16, 3), np.uint8), 4.0, "h264")
    write_video(folder / "video_3.mp4", np.zeros((4, 16, 16, 3), np.uint8), 4.0, "h264")
    assert run_cli(["data", "check", "--benchmark", "mvbench", "--data-root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ok: every video is present and readable"


# ---------------------------------------------------------------------------------------- samples


def test_samples_round_trip_through_a_manifest(tmp_path: Path) -> None:
    bench = BENCHMARKS["mvbench"]
    samples = bench.to_samples(bench.load(write_mvbench(tmp_path / "mvbench")))
    write_manifest(tmp_path / "manifest" / "mvbench.jsonl", samples)
    back = read_manifest(tmp_path / "manifest" / "mvbench.jsonl")
    assert [(s.uid, s.answer, s.options, s.qtype) for s in back] == \
        [("object_existence/0", "A", ("yes", "no"), "object_existence"),
         ("object_existence/1", "B", ("yes", "no"), "object_existence"),
         ("object_existence/2", "B", ("1", "2", "3"), "object_existence")]
    assert back[0].video_path == samples[0].video_path
    assert back[0].meta["prompt"].startswith("Question:Is there a cube?\nOption:\n(A) yes\n(B) no\n")


def test_sample_conversion_errors_name_the_question(tmp_path: Path) -> None:
    duplicate = [{"video": "v.mp4", "question": "q?", "candidates": ["same", "same"], "answer": "same"}]
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "action_count.json").write_text(json.dumps(duplicate), encoding="utf-8")
    bench = BENCHMARKS["mvbench"]
    items = bench.load(tmp_path)
    assert items[0].answer_letter == "A"  # lmms-eval takes the first equal candidate
    with pytest.raises(BenchmarkDataError, match=r"mvbench question action_count/0: options: expected distinct"):
        bench.to_samples(items)

"""Auto-interpretation eval: latents planted on known words of a tiny model, explained and judged by a real local
HTTP server speaking the chat-completions API (right, wrong, silent and garbled judges) and by local transformers
models; the parsing of answers; the uniform window sample of FeatureStatistics it draws non-activating windows from.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from tiny import save_tiny_model, sentences, word_tokenizer, write_jsonl

import saelab
from saelab.analysis.statistics import FeatureStatistics
from saelab.core.errors import ConfigError
from saelab.evals.autointerp import AutoInterpConfig, plot_autointerp, run_autointerp
from saelab.evals.autointerp_prompts import answer_tokens, mark, parse_explanation, parse_numbers, token_pieces
from saelab.evals.explainers import ChatCompletionsLLM, LLMError
from saelab.models import load_model

HOOK = "blocks.0.hook_resid_pre"  # the token embeddings: a latent reading one embedding fires on one word
PLANTED = ["cat", "dog", "mat", "box", "red", "blue", "sat", "ran"]
MARKED = re.compile(r"<<(.*?)>>")
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The tiny model with the embeddings of the PLANTED words made orthogonal to all others, an SAE whose latent i
    fires (0.5) exactly on PLANTED[i], and a text file of sentences over the tiny vocabulary."""
    folder = tmp_path_factory.mktemp("autointerp")
    save_tiny_model(folder / "model")
    tokenizer = word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder / "model")
    model = load_model(str(folder / "model"))
    ids = [tokenizer.convert_tokens_to_ids(w) for w in PLANTED]
    d = len(PLANTED)
    with torch.no_grad():
        embed = model.model.model.embed_tokens.weight
        embed[:, :d] = 0
        embed[ids, :d] = torch.eye(d)
    sae = saelab.create_sae("standard", d_in=32, d_sae=d, hook_name=HOOK, model_name="tiny")
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:d, :d] = torch.eye(d)
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
        sae.W_dec.copy_(sae.W_enc.T)
    text = write_jsonl(folder / "text.jsonl", sentences(400))
    return model, sae, str(text), folder / "model"


def config(text: str, **options) -> AutoInterpConfig:
    settings = dict(n_latents=4, n_contexts=32, dataset=text, samples_per_interval=4, seed=3)
    return AutoInterpConfig(**{**settings, **options})


def explain(user: str) -> str:
    """The scripted explainer: the most frequent marked word."""
    words = Counter(w for span in MARKED.findall(user) for w in span.split())
    return f"This feature activates on the word {words.most_common(1)[0][0]}."


def right_numbers(system: str, user: str) -> list[int]:
    """The excerpts a perfect judge names: detection, those with the explanation's word; fuzzing, those whose
    marks are on that word alone."""
    word = re.search(r"the word (\w+)", user).group(1)
    excerpts = re.findall(r"^(\d+)\. (.*)$", user.split("The excerpts:")[1], flags=re.MULTILINE)
    if "marked between" in system:  # fuzzing
        marked = {n: [w for s in MARKED.findall(t) for w in s.split()] for n, t in excerpts}
        return [int(n) for n, words in marked.items() if words and set(words) == {word}]
    return [int(n) for n, t in excerpts if word in t.split()]


def answers(style: str):
    def answer(messages: list[dict]) -> str:
        system, user = messages[0]["content"], messages[-1]["content"]
        if "Answer in the form: This feature activates on" in system:
            return explain(user)
        n = len(re.findall(r"^\d+\. ", user, flags=re.MULTILINE))
        right = right_numbers(system, user)
        if style == "right":
            return ", ".join(map(str, right)) or "None"
        if style == "wrong":
            return ", ".join(str(k) for k in range(1, n + 1) if k not in right) or "None"
        if style == "none":
            return "None."
        return "I think the feature is about animals, mostly."

    return answer


@pytest.fixture()
def server():
    """A chat-completions server on a free local port: `start(style)` sets its answers; it records each request's
    JSON body and Authorization header."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.server.requests.append((self.path, self.headers.get("Authorization"), body))
            if self.server.status != 200:
                self.send_error(self.server.status, "Unauthorized", "invalid api key")
                return
            content = self.server.answer(body["messages"])
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests, httpd.status = [], 200
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def start(style: str, status: int = 200) -> str:
        httpd.answer, httpd.status = answers(style), status
        httpd.requests.clear()
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1"

    start.requests = httpd.requests
    yield start
    httpd.shutdown()
    httpd.server_close()


def test_a_right_judge_scores_1_and_sees_the_planted_words_marked(planted, server, monkeypatch):
    model, sae, text, _ = planted
    url = server("right")
    monkeypatch.setenv("MY_KEY", "sk-test")
    cfg = config(text, llm_base_url=url, llm_model="judge-1", llm_api_key_env="MY_KEY")
    result = run_autointerp(sae, model, cfg, progress=False)
    metrics = result["eval_result_metrics"]
    assert metrics["autointerp"]["autointerp_score"] == 1.0 and metrics["autointerp"]["n_latents"] == 4
    assert metrics["detection"] == {"accuracy": 1.0, "balanced_accuracy": 1.0, "f1": 1.0}
    assert metrics["fuzzing"] == {"accuracy": 1.0, "balanced_accuracy": 1.0, "f1": 1.0}
    assert metrics["autointerp"]["malformed_answers"] == 0
    details = {d["latent"]: d for d in result["eval_result_details"]}
    assert all(d["explanation"] == f"the word {PLANTED[i]}" for i, d in details.items())
    assert all(d["n_activating"] == 4 and d["n_non_activating"] == 10 for d in details.values())
    requests = server.requests
    assert len(requests) == 3 * 4  # explanation, detection, fuzzing per latent
    assert {(path, auth) for path, auth, _ in requests} == {("/v1/chat/completions", "Bearer sk-test")}
    assert {body["model"] for *_, body in requests} == {"judge-1"}
    explained = [body["messages"][-1]["content"] for *_, body in requests[::3]]
    for latent, user in zip(sorted(details), explained, strict=True):  # latents are interpreted in order
        spans = MARKED.findall(user)
        assert len(spans) >= 10 and {w for s in spans for w in s.split()} == {PLANTED[latent]}
    detection = [body["messages"][-1]["content"] for *_, body in requests[1::3]]
    assert all("<<" not in user and user.count("\n1. ") == 1 for user in detection)
    # everything a reader needs is in the result: prompts, answers, judged examples
    record = result["eval_result_unstructured"]["latents"][str(min(details))]
    # the endpoint is not sent the start of the answer (a final assistant message), which a local model continues
    assert record["explanation_prompt"][-1] == {"role": "assistant", "content": "This feature activates on"}
    assert record["explanation_prompt"][:-1] == requests[0][2]["messages"]
    assert record["detection"]["answer"] == answers("right")(requests[1][2]["messages"])
    assert sum(e["activating"] for e in record["detection"]["examples"]) == 4
    assert result["seconds"] > 0 and result["eval_type_id"] == "autointerp"


@pytest.mark.parametrize("style", ["wrong", "none", "garbage"])
def test_wrong_silent_and_garbled_judges_score_low_and_garbage_is_recorded(planted, server, style):
    model, sae, text, _ = planted
    cfg = config(text, llm_base_url=server(style), llm_model="judge-1", override_latents=[0, 5])
    metrics = run_autointerp(sae, model, cfg, progress=False)["eval_result_metrics"]
    score, chance = metrics["autointerp"]["autointerp_score"], metrics["autointerp"]["chance_score"]
    assert chance == pytest.approx(10 / 14)
    expected = {"wrong": 0.0, "none": chance, "garbage": 0.0}[style]
    assert score == pytest.approx(expected) and metrics["fuzzing"]["accuracy"] == pytest.approx(expected)
    assert metrics["autointerp"]["malformed_answers"] == (4 if style == "garbage" else 0)


def test_garbled_answers_are_recorded_with_the_answer(planted, server):
    model, sae, text, _ = planted
    cfg = config(text, llm_base_url=server("garbage"), llm_model="m", override_latents=[2], fuzzing=False)
    result = run_autointerp(sae, model, cfg, progress=False)
    (detail,) = result["eval_result_details"]
    assert detail["problems"] == [
        "detection: no numbers and no None in the answer 'I think the feature is about animals, mostly.'"
    ]
    examples = result["eval_result_unstructured"]["latents"]["2"]["detection"]["examples"]
    assert {e["predicted"] for e in examples} == {None} and not any(e["correct"] for e in examples)
    assert "fuzzing" not in result["eval_result_metrics"]


def test_an_unreachable_endpoint_is_a_one_line_error(planted):
    model, sae, text, _ = planted
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(text, llm_base_url=f"http://127.0.0.1:{port}/v1", llm_model="m", llm_retries=0)
    with pytest.raises(LLMError, match=rf"cannot reach the LLM at http://127.0.0.1:{port}/v1/chat/completions: ") as e:
        run_autointerp(sae, model, cfg, progress=False)
    assert "\n" not in str(e.value)


def test_an_http_error_names_the_status_and_the_missing_key(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    llm = ChatCompletionsLLM(server("right", status=401), "m", api_key=None, retries=0, api_key_env="NO_SUCH_KEY")
    with pytest.raises(LLMError, match="HTTP 401 .*environment variable NO_SUCH_KEY is not set"):
        llm([{"role": "user", "content": "hi"}], 5)
    assert server.requests[0][1] is None  # no Authorization header without a key


def test_a_local_transformers_model_explains_through_its_chat_template(planted):
    model, sae, text, folder = planted
    cfg = config(text, llm_model=str(folder), override_latents=[1], max_tokens_in_explanation=12, fuzzing=False)
    result = run_autointerp(sae, model, cfg, progress=False)
    assert "TransformersLLM" in result["eval_result_unstructured"]["llm"]
    explainer = load_model(
        str(folder), dtype="auto"
    )  # the recorded answers are greedy continuations of the templated prompts
    tokenizer = explainer.tokenizer
    record = result["eval_result_unstructured"]["latents"]["1"]
    for messages, answer, max_tokens in (
        (record["explanation_prompt"], record["explanation_answer"], 12),
        (record["detection"]["prompt"], record["detection"]["answer"], answer_tokens(14)),
    ):
        start = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        chat = messages[:-1] if start else messages
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) + start
        assert prompt.startswith("[system] You ") and prompt.endswith("[assistant]" + start)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = explainer.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens)
        assert answer == start + tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert record["explanation_answer"].startswith("This feature activates on")
    # the tiny model answers nonsense: recorded, counted as wrong, never a crash
    (detail,) = result["eval_result_details"]
    assert parse_numbers(record["detection"]["answer"], 14)[0] is None
    assert detail["autointerp_score"] == 0 and detail["problems"][0].startswith("detection: ")


def test_answers_are_parsed_leniently_and_garbage_is_reported():
    assert parse_numbers("None", 14) == (set(), None)
    assert parse_numbers(" none.", 14) == (set(), None)
    assert parse_numbers("1, 3 and 5", 14) == ({1, 3, 5}, None)
    assert parse_numbers("Excerpts:\n2, 14.\nBecause 7 mentions ...", 14) == ({2, 14}, None)
    for garbage in ("the feature is about cats", "", "0, 3", "15"):
        numbers, problem = parse_numbers(garbage, 14)
        assert numbers is None and problem
    assert parse_explanation("This feature activates on the word 'cat'.\n") == ("the word 'cat'", None)
    assert parse_explanation("Sure! This neuron activates on plural nouns.") == ("plural nouns", None)
    assert parse_explanation("plural nouns") == ("plural nouns", None)
    assert parse_explanation("This feature activates on nouns. It also activates on verbs") == ("nouns", None)
    assert parse_explanation('"plural nouns".') == ("plural nouns", None)
    assert parse_explanation("  \n") == ("", "empty answer")


def test_marks_merge_runs_and_keep_spaces_outside():
    pieces = ["The", " cat", " sat", "\n", " on", "\ufffd"]
    assert mark(pieces, [False, True, True, False, True, False]) == "The <<cat sat>>↵ <<on>>"
    tokenizer = word_tokenizer()
    ids = tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, [-1, tokenizer.bos_token_id, *ids], hidden={tokenizer.bos_token_id})
    assert pieces[:2] == ["", ""] and "".join(pieces) == tokenizer.decode(ids)
    assert mark(pieces, [False, False, False, True, False]) == "the <<cat>> sat"


def test_bad_settings_are_one_line_errors(planted):
    model, sae, text, _ = planted
    with pytest.raises(ConfigError, match="quantile_intervals must divide 32"):
        AutoInterpConfig(quantile_intervals=3)
    with pytest.raises(ConfigError, match="llm_base_url must start with http"):
        AutoInterpConfig(llm_base_url="localhost:8000")
    with pytest.raises(ConfigError, match="override_latents go up to 99; d_sae is 8"):
        run_autointerp(sae, model, config(text, override_latents=[99], llm_base_url="http://x/v1", llm_model="m"))
    with pytest.raises(ConfigError, match="set llm_model: the name of the model the endpoint"):
        run_autointerp(sae, model, config(text, llm_base_url="http://127.0.0.1:1/v1"), progress=False)


def test_a_latent_that_never_fires_is_skipped_with_the_reason(planted, server):
    model, sae, text, _ = planted
    dead = saelab.create_sae("standard", d_in=32, d_sae=9, hook_name=HOOK, model_name="tiny")
    with torch.no_grad():
        dead.W_enc.zero_()
        dead.W_enc[:, :8], dead.b_enc[:8], dead.W_dec[:8] = sae.W_enc, sae.b_enc, sae.W_dec
        dead.b_enc[8], _ = -1.0, dead.b_dec.zero_()  # latent 8 never fires
    cfg = config(text, llm_base_url=server("right"), llm_model="m", override_latents=[8, 4], fuzzing=False)
    result = run_autointerp(dead, model, cfg, progress=False)
    assert [d["latent"] for d in result["eval_result_details"]] == [4]
    assert result["eval_result_unstructured"]["skipped_latents"]["8"].startswith("fires 0 times")
    assert result["eval_result_unstructured"]["eligible_latents"] == 8


def test_the_plot_compares_saes(planted, server, tmp_path):
    model, sae, text, _ = planted
    right = run_autointerp(sae, model, config(text, llm_base_url=server("right"), llm_model="m"), progress=False)
    wrong = run_autointerp(sae, model, config(text, llm_base_url=server("wrong"), llm_model="m"), progress=False)
    prompts = [
        [r["explanation_prompt"] for r in x["eval_result_unstructured"]["latents"].values()] for x in (right, wrong)
    ]
    assert prompts[0] == prompts[1]  # the same seed: the same latents and windows
    (path,) = plot_autointerp({"right judge": right, "wrong judge": wrong}, tmp_path)
    assert path == tmp_path / "autointerp_scores.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_the_window_sample_is_uniform_and_exact():
    """FeatureStatistics(random_windows=n): windows around counted tokens only, with the tokens and each latent's
    maximum over the window exactly as in the batch; drawn from every batch, the same for the same seed."""
    left, right, n = 2, 1, 40
    stats = [FeatureStatistics(3, window=(left, right), random_windows=n, seed=7) for _ in range(2)]
    batches = []
    for b in range(6):
        tokens = b * 1000 + torch.arange(4)[:, None] * 100 + torch.arange(10)  # every token id tells its place
        latents = torch.relu(torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(b)))
        keep = torch.ones(4, 10, dtype=torch.bool)
        keep[:, 0] = False
        batches.append((tokens, latents * keep.unsqueeze(-1)))
        for s in stats:
            s.add(tokens, latents, keep)
    result, again = (s.result() for s in stats)
    assert torch.equal(result.random_tokens, again.random_tokens) and result.random_tokens.shape == (n, 4)
    seen_batches = set()
    for window, maxima in zip(result.random_tokens.tolist(), result.random_max, strict=True):
        centre = window[left]
        b, context, position = centre // 1000, centre % 1000 // 100, centre % 100
        assert position != 0  # position 0 is not counted
        seen_batches.add(b)
        lo, hi = max(position - left, 0), min(position + right + 1, 10)
        expected = [-1] * (left - position + lo) + batches[b][0][context, lo:hi].tolist()
        assert window == expected + [-1] * (left + right + 1 - len(expected))
        assert torch.allclose(maxima, batches[b][1][context, lo:hi].amax(0))
    assert len(seen_batches) >= 5  # a uniform sample of 40 of 216 tokens in 6 batches, not the first ones
    assert len({tuple(w) for w in result.random_tokens.tolist()}) == n


@pytest.mark.slow
def test_smollm2_explains_latents_of_an_sae_on_itself():
    """The default explainer, SmolLM2-135M-Instruct, on a random TopK SAE of its own residual stream: the pipeline
    runs end to end and records what the 135M model says (its scores are whatever they are)."""
    model = load_model()
    torch.manual_seed(0)
    sae = saelab.create_sae(
        "topk", d_in=576, d_sae=256, k=16, hook_name="blocks.5.hook_resid_post", model_name="smollm2-135m"
    )
    cfg = AutoInterpConfig(n_latents=3, n_contexts=64)
    result = run_autointerp(sae, model, cfg, progress=False)
    assert result["eval_result_metrics"]["autointerp"]["n_latents"] == 3
    assert "smollm2-135m" in result["eval_result_unstructured"]["llm"]
    for detail in result["eval_result_details"]:
        assert 0 <= detail["autointerp_score"] <= 1
        record = result["eval_result_unstructured"]["latents"][str(detail["latent"])]
        assert record["explanation_answer"] and "<|im_start|>" not in record["explanation_answer"]
        prompt = record["explanation_prompt"]  # the examples, then the answer's start as the assistant's turn
        assert "<<" in prompt[-2]["content"] and prompt[-1] == {
            "role": "assistant",
            "content": "This feature activates on",
        }

"""`vrwkv serve` through the real `openai` client: answers, streaming, multi-turn with the state
cache, usage, errors, 16 concurrent clients, a disconnect that frees its row."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_helpers import API_KEY, data_url, live  # noqa: E402,F401 (live: the server fixture)

from serve_helpers import COLORS  # noqa: E402


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0)


def image_msg(text: str, color=COLORS[0], url: str | None = None) -> dict:
    url = url or data_url(Image.new("RGB", (40, 30), color))
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


def session_answers(live, color, questions, max_tokens):
    """What `ChatSession` (the `chat` command's engine) answers, greedy: the reference."""
    from vrwkv_core.infer import ChatSession

    chat = ChatSession(live.vlm, live.tok, prefill_pad=False)  # as the test server
    chat.add_image(Image.new("RGB", (40, 30), color))
    out = []
    for q in questions:
        result = chat.ask(q, max_new_tokens=max_tokens).run()
        out.append(result)
    return out


def test_models_health_and_page(live, client):
    assert [m.id for m in client.models.list().data] == [live.model_name]
    assert client.models.list().data[0].owned_by == "vrwkv"
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["auth"] is True
    page = httpx.get(live.url + "/")  # the demo page loads without the key
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_plain_answer_equals_chat_session(live, client):
    from vrwkv_core.data.conversation import encode_generation_prompt

    r = client.chat.completions.create(model=live.model_name, messages=[image_msg("What color is the shape?")],
                                       max_tokens=6, temperature=0)  # fmt: skip
    ref = session_answers(live, COLORS[0], ["What color is the shape?"], 6)[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == live.model_name
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text.lstrip()
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    n_prompt = len(encode_generation_prompt("What color is the shape?", live.tok, live.vlm.tokens_per_image))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == n_prompt + len(ref.token_ids)


def test_streamed_answer_equals_plain(live, client):
    kw = dict(model=live.model_name, messages=[image_msg("Describe the image.", COLORS[1])], max_tokens=10,
              temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]  # ignore_eos: exactly max_tokens tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    # the raw stream ends with [DONE]
    body = {**{k: v for k, v in kw.items() if k != "extra_body"}, "stream": True, "ignore_eos": True}
    raw = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and raw.headers["content-type"].startswith("text/event-stream")


def test_multi_turn_uses_the_state_cache(live, client):
    q1, q2 = "What color is the shape?", "What shape is it?"
    ref = session_answers(live, COLORS[2], [q1, q2], 5)
    msgs = [image_msg(q1, COLORS[2])]
    r1 = client.chat.completions.create(model=live.model_name, messages=msgs, max_tokens=5, temperature=0)
    assert r1.choices[0].message.content == ref[0].text.lstrip()
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": q2}]
    r2 = client.chat.completions.create(model=live.model_name, messages=msgs, max_tokens=5, temperature=0)
    assert r2.choices[0].message.content == ref[1].text.lstrip()  # the same as chat's second turn
    # the first turn's state was restored: only the unfed answer token(s), "\n\n" and the new turn ran
    seen = r1.usage.prompt_tokens + r1.usage.completion_tokens - (1 if r1.choices[0].finish_reason == "length" else 0)
    assert r2.usage.prompt_tokens_details.cached_tokens == seen
    assert r2.usage.prompt_tokens > seen
    # a new question about the same image skips the towers and the image prefill
    r3 = client.chat.completions.create(model=live.model_name, messages=[image_msg(q2, COLORS[2])], max_tokens=2)
    assert 0 < r3.usage.prompt_tokens_details.cached_tokens < r3.usage.prompt_tokens


def test_image_from_image_root(live, client):
    by_path = client.chat.completions.create(model=live.model_name, messages=[image_msg("Color?", url="red.png")],
                                             max_tokens=4, temperature=0)  # fmt: skip
    by_data = client.chat.completions.create(model=live.model_name, messages=[image_msg("Color?", COLORS[0])],
                                             max_tokens=4, temperature=0)  # fmt: skip
    uri = (live.root / "red.png").as_uri()
    by_uri = client.chat.completions.create(model=live.model_name, messages=[image_msg("Color?", url=uri)],
                                            max_tokens=4, temperature=0)  # fmt: skip
    assert by_path.choices[0].message.content == by_data.choices[0].message.content == by_uri.choices[0].message.content


def _png_b64(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BAD_REQUESTS = [
    # (name, request changes, status, code, text in the message)
    ("bad base64", {"image": "data:image/png;base64,@@@notbase64"}, 400, "invalid_base64", "base64"),
    ("not an image", {"image": "data:image/png;base64," + base64.b64encode(b"hello world").decode()}, 400,
     "invalid_image", "not an image"),
    ("too large", {"image": "data:image/png;base64," + base64.b64encode(b"x" * 70_000).decode()}, 413,
     "image_too_large", "65,536"),
    ("http url", {"image": "https://example.com/cat.png"}, 400, "invalid_image_url", "not fetched"),
    ("outside the root", {"image": "../../etc/passwd"}, 400, "invalid_image_url", "outside --image-root"),
    ("long prompt", {"text": "word " * 700}, 400, "context_length_exceeded", "more than the 600"),
    ("unknown model", {"model": "gpt-4o"}, 404, "model_not_found", "gpt-4o"),
    ("n=2", {"n": 2}, 400, "invalid_value", "n must be 1"),
    ("last turn assistant", {"messages_tail": {"role": "assistant", "content": "hi"}}, 400, "invalid_messages", "last message"),
    ("bad temperature", {"temperature": -1}, 400, "invalid_request", "temperature"),
    ("no messages", {"messages": []}, 400, "invalid_request", "messages"),
    ("wrong role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request", "messages.0.role"),
]


@pytest.mark.parametrize("name, change, status, code, text", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(live, name, change, status, code, text):
    body = {"model": live.model_name, "max_tokens": 2,
            "messages": [image_msg(change.get("text", "Color?"), url=change.get("image", data_url(Image.new("RGB", (8, 8)))))]}  # fmt: skip
    for key in ("model", "n", "temperature", "messages"):
        if key in change:
            body[key] = change[key]
    if "messages_tail" in change:
        body["messages"].append(change["messages_tail"])
    r = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and text in err["message"], err


def test_errors_through_the_openai_client(live, client):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.get(live.url + "/v1/models")  # no key at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live.model_name, messages=[image_msg("x", url="data:image/png;base64,!!")])
    assert e.value.status_code == 400
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {API_KEY}",
                                                                                    "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(live.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_sixteen_concurrent_clients_equal_sequential(live, client):
    questions = ["What color is the shape?", "What shape is it?", "Describe the image.", "Is it big?"]
    requests = [(COLORS[i % 4], questions[i // 4]) for i in range(16)]

    def ask(color, q):
        r = client.chat.completions.create(model=live.model_name, messages=[image_msg(q, color)], max_tokens=24,
                                           temperature=0, extra_body={"min_tokens": 12})  # fmt: skip
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    sequential = [ask(c, q) for c, q in requests]
    results: list = [None] * 16
    steps_before, single_before = live.metric("vrwkv_decode_batch_rows_count"), _single_steps(live)

    def worker(i):
        results[i] = ask(*requests[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential
    multi = (live.metric("vrwkv_decode_batch_rows_count") - steps_before) - (_single_steps(live) - single_before)
    assert multi > 0  # some steps really decoded several rows together


def _single_steps(live) -> float:
    text = httpx.get(live.url + "/metrics").text
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith('vrwkv_decode_batch_rows_bucket{le="1.0"}'))


def test_disconnect_mid_stream_frees_the_row(live):
    body = {"model": live.model_name, "messages": [image_msg("Tell me a long story.")], "stream": True,
            "max_tokens": 100_000, "ignore_eos": True, "temperature": 0}  # fmt: skip
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", live.url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as r:  # fmt: skip
            lines = r.iter_lines()
            got = [next(lines) for _ in range(8)]
            assert any('"content"' in line for line in got)
            assert live.metric("vrwkv_active_rows") == 1
    deadline = time.monotonic() + 10
    while live.metric("vrwkv_active_rows") != 0:
        assert time.monotonic() < deadline, "the row of a disconnected client was not freed"
        time.sleep(0.05)
    assert live.engine.active_rows == 0


def test_disconnect_while_waiting_for_a_plain_answer_frees_the_row(live):
    body = {"model": live.model_name, "messages": [image_msg("Tell me a long story.")], "max_tokens": 100_000,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    with httpx.Client(timeout=httpx.Timeout(30, read=1.0)) as http:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            http.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    deadline = time.monotonic() + 10
    while live.engine.active_rows != 0:
        assert time.monotonic() < deadline, "the row of a disconnected client was not freed"
        time.sleep(0.05)


def test_metrics_count_requests_and_tokens(live, client):
    before = live.metric("vrwkv_generation_tokens_total")
    r = client.chat.completions.create(model=live.model_name, messages=[image_msg("Color?")], max_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.completion_tokens == 3
    assert live.metric("vrwkv_generation_tokens_total") == before + 3
    text = httpx.get(live.url + "/metrics").text
    for name in ("vrwkv_requests_total", "vrwkv_prompt_tokens_total", "vrwkv_queue_depth",
                 "vrwkv_time_to_first_token_seconds_bucket", "vrwkv_time_per_output_token_seconds_bucket"):
        assert name in text


def test_min_tokens_and_stop_strings(live, client):
    r = client.chat.completions.create(model=live.model_name, messages=[image_msg("Color?")], max_tokens=6,
                                       temperature=0, extra_body={"min_tokens": 6})  # fmt: skip
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    full = r.choices[0].message.content
    if len(full) > 2:
        cut = client.chat.completions.create(model=live.model_name, messages=[image_msg("Color?")], max_tokens=6,
                                             temperature=0, stop=[full[1:3]], extra_body={"min_tokens": 6})  # fmt: skip
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[:1].lstrip()
    json.dumps(r.model_dump())


def test_prompt_pads_the_first_prefill_as_chat_does(live):
    """The first prefill (up to the first `Assistant:`) is padded with token 261 to a multiple of 16
    for a v7.00 model, exactly as ChatSession pads it; later turns are not; prefill_pad=False: none."""
    from vrwkv_core.data.conversation import encode_generation_prompt
    from vrwkv_core.serve.prompt import build_prompt
    from vrwkv_core.serve.schemas import Message

    msgs = [Message(role="user", content="What color is it?"), Message(role="assistant", content="red"),
            Message(role="user", content="Sure?")]  # fmt: skip
    first = encode_generation_prompt("What color is it?", live.tok, live.vlm.tokens_per_image, n_images=0)
    n_pad = (-len(first)) % 16
    padded = build_prompt(msgs, live.tok, live.vlm, load_image=None, prefill_pad=True)
    plain = build_prompt(msgs, live.tok, live.vlm, load_image=None, prefill_pad=False)
    assert n_pad and padded.ids == [261] * n_pad + plain.ids
    assert plain.ids[: len(first)] == first and plain.ids.count(261) == padded.ids.count(261) - n_pad
    assert padded.boundaries == [b + n_pad for b in plain.boundaries]

"""The Ray Serve endpoint through the official OpenAI client and raw HTTP (plain and streaming answers, batching, every
bad-input case, image URLs from a local image host, capacity), against plain transformers' answers."""
from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests
import torch
from PIL import Image

from llava_core.config import ServeSettings
from tests.ports import free_port
from tests.serve_requests import (
    BAD_REQUESTS,
    BOMB,
    FETCH_TIMEOUT_S,
    GOOD_PNG,
    IMAGE_URLS,
    LIMITS,
    MODEL,
    good_body,
    image_part,
    image_url_part,
    noise_png,
    png_bytes,
    wide_image,
    with_content,
)

API_KEY = "test-key"
MAX_TOKENS = 6
# Small capacity, so that a burst of requests overflows it: 8 in the replica, 8 waiting, the rest get 429. (Serve counts
# requests that arrive together as queued until each is assigned, so the queue must hold a batch's worth.)
CAPACITY = dict(max_ongoing_requests=8, max_queued_requests=8)


def tall_image() -> Image.Image:
    return Image.new("RGB", (20, 56), (30, 160, 60))


class ImageHost(ThreadingHTTPServer):
    """A tiny web server on 127.0.0.1 that records every request it gets."""
    daemon_threads = True

    def __init__(self, routes: dict):
        self.routes, self.requested = routes, []
        super().__init__(("127.0.0.1", 0), ImageHostHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server_address[1]}{path}"


class ImageHostHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.requested.append((self.path, self.headers.get("Host")))
        status, headers, body, delay = self.server.routes.get(self.path, (404, {}, b"", 0))
        time.sleep(delay)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_host():
    big = noise_png(120)
    routes = {
        "/cat.png": (200, {"Content-Type": "image/png", "Content-Length": str(len(GOOD_PNG))}, GOOD_PNG, 0),
        "/big.png": (200, {"Content-Length": str(len(big))}, big, 0),
        "/big-undeclared.png": (200, {}, big, 0),  # no Content-Length: counted while read
        "/slow.png": (200, {}, GOOD_PNG, FETCH_TIMEOUT_S + 2),
        "/moved.png": (302, {"Location": "/cat.png"}, b"", 0),
        "/page.html": (200, {"Content-Type": "text/html"}, b"<html>not a picture</html>", 0),
    }
    host = ImageHost(routes)
    yield host
    host.shutdown()


@pytest.fixture(scope="module")
def server(ray_session, tiny_llava_dir, tmp_path_factory):
    from llava_core.serve.client import deploy, shutdown

    # The key lives in a file the replica reads (as a mounted Kubernetes secret), never in the settings.
    key_file = tmp_path_factory.mktemp("secrets") / "api-key"
    key_file.write_text(API_KEY)
    # A batch wait of 0.1 s lets concurrent requests meet in one batch even on a slow, busy machine.
    settings = ServeSettings(port=free_port(), api_key_file=str(key_file), max_batch_size=8, batch_wait_timeout_s=0.1,
                             default_max_tokens=4, **LIMITS, **CAPACITY, **IMAGE_URLS)
    url = deploy(tiny_llava_dir, settings, MODEL)
    yield url
    shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_llava_dir):
    """Greedy answers from plain transformers with the export's own processor (which pads images to a square)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)

    @torch.inference_mode()
    def answer(messages: list[dict], images: list[Image.Image], max_new_tokens: int = MAX_TOKENS) -> dict:
        pictures = iter(images)  # each {"type": "image"} part gets its image, as transformers' chat inputs carry them
        messages = [{**m, "content": [{**part, "image": next(pictures)} if part["type"] == "image" else part
                                      for part in m["content"]]} if isinstance(m["content"], list) else m
                    for m in messages]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        raw = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return {"text": raw.strip(), "raw": raw, "prompt_tokens": inputs["input_ids"].shape[1]}

    return answer


def ask(client, messages: list[dict], **options):
    options = {"max_tokens": MAX_TOKENS, "temperature": 0, **options}
    return client.chat.completions.create(model=MODEL, messages=messages, **options)


def test_answer_with_image_matches_transformers(client, reference):
    question = "What colour is the square?"
    expected = reference([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                         [wide_image()])
    assert expected["text"], "the reference answer is empty, so the comparison would prove nothing"

    response = ask(client, [{"role": "user", "content": [{"type": "text", "text": question},
                                                         image_part(png_bytes(wide_image()))]}])

    assert response.object == "chat.completion" and response.model == MODEL and response.id
    assert response.choices[0].message.content == expected["text"]
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == expected["prompt_tokens"]
    assert 0 < response.usage.completion_tokens <= MAX_TOKENS


def test_multi_turn_history_with_image_in_an_earlier_turn(client, reference):
    history = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
               {"role": "assistant", "content": "A green bar."},
               {"role": "user", "content": "How tall is it?"}]
    expected = reference(history, [tall_image()])

    sent = [dict(history[0], content=[image_part(png_bytes(tall_image())),
                                      {"type": "text", "text": "What is this?"}])] + history[1:]
    response = ask(client, sent)

    assert response.choices[0].message.content == expected["text"]
    assert response.usage.prompt_tokens == expected["prompt_tokens"]


def test_stop_string_cuts_the_answer(client, reference):
    messages = [{"role": "user", "content": "Describe the picture."}]
    raw = reference(messages, [], max_new_tokens=12)["raw"]
    assert len(raw) >= 4, "the reference answer is too short to cut"
    stop = raw[len(raw) // 2:len(raw) // 2 + 2]

    response = ask(client, messages, max_tokens=12, stop=[stop])

    assert response.choices[0].message.content == raw[:raw.find(stop)].strip()
    assert response.choices[0].finish_reason == "stop"


def stream_chunks(client, messages: list[dict], **options) -> list:
    options = {"max_tokens": MAX_TOKENS, "temperature": 0, **options}
    return list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **options))


def test_streaming_with_image_gives_the_plain_answer_in_deltas(client, reference):
    question = "What colour is the square?"
    expected = reference([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                         [wide_image()])
    messages = [{"role": "user", "content": [{"type": "text", "text": question}, image_part(png_bytes(wide_image()))]}]

    chunks = stream_chunks(client, messages, stream_options={"include_usage": True})
    plain = ask(client, messages)

    assert all(chunk.object == "chat.completion.chunk" and chunk.model == MODEL for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2, f"the answer came in one piece, not streamed: {deltas}"
    assert "".join(deltas) == expected["text"] == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == expected["prompt_tokens"] == plain.usage.prompt_tokens
    assert usage_chunk.usage.completion_tokens == plain.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_streaming_with_a_stop_string_holds_back_the_stop(client, reference):
    messages = [{"role": "user", "content": "Describe the picture."}]
    raw = reference(messages, [], max_new_tokens=12)["raw"]
    stop = raw[len(raw) // 2:len(raw) // 2 + 2]

    chunks = stream_chunks(client, messages, max_tokens=12, stop=[stop])

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = ask(client, messages, max_tokens=12, stop=[stop]).choices[0].message.content
    assert text == raw[:raw.find(stop)].strip() == plain
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_raw_event_stream_ends_with_done_and_no_usage_unless_asked(server):
    body = good_body(stream=True, max_tokens=3)
    response = requests.post(server + "/v1/chat/completions", json=body, stream=True, timeout=60,
                             headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert all("usage" not in payload for payload in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_repeats(client):
    messages = [{"role": "user", "content": "Say something."}]
    first, second = (ask(client, messages, temperature=1.0, top_p=0.9, seed=7) for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content


def test_models_lists_the_served_model(client, server):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert requests.get(server + "/health", timeout=30).status_code == 200  # no key needed: load balancers probe it




@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_in_openai_shape(server, case):
    body, status, fragment = BAD_REQUESTS[case]
    data = body if isinstance(body, bytes) else json.dumps(body)
    response = requests.post(server + "/v1/chat/completions", data=data,
                             headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
                             timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}])
def test_missing_or_wrong_key_is_401(server, headers):
    response = requests.post(server + "/v1/chat/completions", json=good_body(), headers=headers, timeout=60)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_openai_client_raises_its_typed_errors(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        ask(client, [{"role": "user", "content": "hi"}], max_tokens=0)
    wrong_key = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()


def test_bomb_is_small_but_huge():
    assert len(BOMB) < LIMITS["max_image_bytes"] and Image.open(io.BytesIO(BOMB)).size == (8000, 8000)


def test_max_completion_tokens_n_1_and_usage(client, reference):
    messages = [{"role": "user", "content": [image_part(GOOD_PNG), {"type": "text", "text": "Colour?"}]}]
    expected = reference([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                         [wide_image()], max_new_tokens=3)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, n=1,
                                              temperature=0)
    assert len(response.choices) == 1
    assert response.choices[0].message.content == expected["text"]
    usage = response.usage
    assert usage.prompt_tokens == expected["prompt_tokens"] and 0 < usage.completion_tokens <= 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_health_and_readiness_need_no_key(server):
    assert requests.get(server + "/health", timeout=30).json() == {"status": "ok"}
    ready = requests.get(server + "/ready", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": MODEL}


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc"])
def test_api_descriptions_follow_the_api_key(server, path):
    assert requests.get(server + path, timeout=30).status_code == (404 if path == "/redoc" else 401)
    if path != "/redoc":
        allowed = requests.get(server + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert allowed.status_code == 200
        assert ("/v1/chat/completions" in allowed.json()["paths"]) if path == "/openapi.json" else \
            "swagger" in allowed.text.lower()


def post_raw(server: str, data, **headers) -> requests.Response:
    return requests.post(server + "/v1/chat/completions", data=data, timeout=60,
                         headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                                  **headers})


def test_a_body_sent_too_slowly_gets_408(server):
    import socket
    import urllib.parse

    target = urllib.parse.urlsplit(server)
    started = time.monotonic()
    with socket.create_connection((target.hostname, target.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ".encode())
        answer = b""  # nothing more is sent: the server must give up, answer and close
        while b"request_timeout" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
        answer = answer.decode(errors="replace")
    elapsed = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert '"code":"request_timeout"' in answer.replace(" ", "")
    assert LIMITS["body_read_timeout_s"] <= elapsed < 20


def test_oversize_body_is_413_before_parsing(server):
    # Not even JSON: a body over the limit is refused for its size, without being parsed.
    too_big = b"x" * (LIMITS["max_body_bytes"] + 1)
    response = post_raw(server, too_big)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"

    # A chunked body declares no length: it is counted while it is read.
    chunked = post_raw(server, (too_big[i:i + 50_000] for i in range(0, len(too_big), 50_000)))
    assert chunked.status_code == 413, chunked.text
    assert "limit of 200000 bytes" in chunked.json()["error"]["message"]


def test_burst_over_capacity_gets_429_and_never_a_500(server):
    body = json.dumps(good_body(max_tokens=LIMITS["max_tokens_limit"], messages=[{"role": "user", "content": "Go"}]))
    burst = 40
    start_together = threading.Barrier(burst)
    statuses: list = [None] * burst

    retry_after = set()

    def send(index: int) -> None:
        start_together.wait()
        response = post_raw(server, body)
        statuses[index] = response.status_code
        if response.status_code == 429:
            retry_after.add(response.headers.get("retry-after"))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(burst)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0, "the burst never overflowed the queue"
    assert retry_after == {"1"}
    assert statuses.count(200) >= CAPACITY["max_ongoing_requests"], statuses


def test_image_url_from_an_allowed_host_gives_the_inline_answer(client, image_host):
    question = [{"type": "text", "text": "What colour is the square?"}]
    by_url = ask(client, [{"role": "user", "content": question + [image_url_part(image_host.url("/cat.png"))]}])
    inline = ask(client, [{"role": "user", "content": question + [image_part(GOOD_PNG)]}])
    assert by_url.choices[0].message.content == inline.choices[0].message.content
    assert by_url.usage == inline.usage
    assert ("/cat.png", f"127.0.0.1:{image_host.server_address[1]}") in image_host.requested


# path on the image host (or a full URL) -> (status, a fragment of the message)
BAD_IMAGE_URLS = {
    "host not on the allowlist": ("http://localhost:{port}/cat.png?never", "'localhost' is not allowed"),
    "over the byte limit, declared": ("/big.png", "over the limit of 30000 bytes"),
    "over the byte limit, undeclared": ("/big-undeclared.png", "larger than the limit of 30000 bytes"),
    "too slow": ("/slow.png", "no answer within 1s"),
    "redirect": ("/moved.png", "redirects are not followed"),
    "not found": ("/missing.png", "HTTP 404"),
    "not an image": ("/page.html", "not an image"),
    "credentials in the URL": ("http://user:pw@127.0.0.1:{port}/cat.png?never", "credentials"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGE_URLS))
def test_bad_image_url_gets_a_400(server, image_host, case):
    target, fragment = BAD_IMAGE_URLS[case]
    url = target.format(port=image_host.server_address[1]) if "://" in target else image_host.url(target)
    started = time.monotonic()
    response = post_raw(server, json.dumps(with_content(image_url_part(url))))
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]
    assert time.monotonic() - started < FETCH_TIMEOUT_S + 10
    if case in ("host not on the allowlist", "credentials in the URL"):
        assert not any(path.startswith("/cat.png?never") for path, _ in image_host.requested)


def test_host_resolving_to_a_private_address_is_refused_without_a_request(image_host):
    from llava_core.serve.errors import ApiError
    from llava_core.serve.image_fetch import fetch_image_bytes

    settings = ServeSettings(image_url_hosts=["localhost", "127.0.0.1"])  # private hosts refused by default
    before = list(image_host.requested)
    for host in ("localhost", "127.0.0.1"):
        with pytest.raises(ApiError, match="resolves to a private or reserved address"):
            fetch_image_bytes(image_host.url("/cat.png", host), settings, "image_url")
    assert image_host.requested == before


def test_fetch_connects_to_the_address_it_checked(image_host, monkeypatch):
    """The resolver is replaced (a made-up name has no DNS here): the name resolves once, and the request goes to
    that address with the name as its Host header."""
    from llava_core.serve import image_fetch

    looked_up = []
    monkeypatch.setattr(image_fetch, "resolve", lambda host, port: looked_up.append(host) or ["127.0.0.1"])
    settings = ServeSettings(image_url_hosts=["images.example.test"], allow_private_image_hosts=True)
    port = image_host.server_address[1]

    data = image_fetch.fetch_image_bytes(f"http://images.example.test:{port}/cat.png", settings, "image_url")

    assert data == GOOD_PNG and looked_up == ["images.example.test"]
    assert image_host.requested[-1] == ("/cat.png", f"images.example.test:{port}")


@pytest.mark.parametrize("addresses", [["10.1.2.3"], ["93.184.216.34", "192.168.0.7"], ["169.254.169.254"],
                                       ["::1"], ["::ffff:127.0.0.1"], ["fe80::1%eth0"], ["100.64.0.1"], ["0.0.0.0"]])
def test_any_internal_address_among_the_answers_is_refused(monkeypatch, addresses):
    """The resolver is replaced so the test needs no DNS; refused before any connection is tried."""
    from llava_core.serve import image_fetch
    from llava_core.serve.errors import ApiError

    monkeypatch.setattr(image_fetch, "resolve", lambda host, port: addresses)
    monkeypatch.setattr(image_fetch, "download", lambda *args: pytest.fail("connected to an internal address"))
    with pytest.raises(ApiError, match="private or reserved"):
        image_fetch.fetch_image_bytes("https://images.example.test/a.png",
                                      ServeSettings(image_url_hosts=["images.example.test"]), "image_url")
    assert image_fetch.is_public_address("93.184.216.34") and image_fetch.is_public_address("2606:4700::1111")


def test_normal_request_succeeds_after_the_bad_ones(client, reference):
    question = [{"type": "image"}, {"type": "text", "text": "Hi?"}]
    expected = reference([{"role": "user", "content": question}], [wide_image()], max_new_tokens=2)
    response = ask(client, good_body()["messages"], max_tokens=2)
    assert response.choices[0].message.content == expected["text"]


def test_concurrent_requests_share_batches_and_keep_their_answers(client, reference):
    from llava_core.serve.app import BATCH_SIZE_HEADER

    # Different prompt lengths and images, so the batch really is left-padded.
    questions = [f"Question {i}: what do you see{'?' * i}" for i in range(8)]
    requests = [([{"role": "user", "content": [{"type": "text", "text": q}, image_part(png_bytes(wide_image()))]}]
                 if i % 2 else [{"role": "user", "content": q}]) for i, q in enumerate(questions)]
    expected = [reference([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                          if i % 2 else [{"role": "user", "content": q}], [wide_image()] if i % 2 else [])["text"]
                for i, q in enumerate(questions)]
    start_together = threading.Barrier(len(requests))
    results: list = [None] * len(requests)

    def send(index: int) -> None:
        start_together.wait()
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=requests[index], max_tokens=MAX_TOKENS, temperature=0)
        results[index] = (raw.parse().choices[0].message.content, int(raw.headers[BATCH_SIZE_HEADER]))

    def send_streaming(index: int) -> None:
        start_together.wait()
        with client.chat.completions.with_streaming_response.create(
                model=MODEL, messages=requests[index], max_tokens=MAX_TOKENS, temperature=0, stream=True) as raw:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
            results[index] = (text, int(raw.headers[BATCH_SIZE_HEADER]))

    # A third of the requests stream: streaming and plain requests share the same batches.
    threads = [threading.Thread(target=send_streaming if i % 3 == 0 else send, args=(i,))
               for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert all(result is not None for result in results), "some requests failed"
    assert [answer for answer, _ in results] == expected
    assert max(batch_size for _, batch_size in results) > 1


# Requests that each fail their own way, sent among valid ones.
NEIGHBOURS = ["top_p 1e-300", "JSON nested 5,000 deep", "integer literal of 5,000 digits", "lone surrogate in the text",
              "a 1 x 10,000 image", "prompt over the character limit", "decompression bomb", "truncated image"]


def test_under_mixed_load_no_valid_request_fails_because_of_a_neighbour(server, reference):
    """16 clients, valid and hostile requests interleaved so they share batches: every valid request gets its own
    answer, every hostile one its own 400. A 429 (the queue was full) is retried after its Retry-After, as clients
    do; it is not a failure of the request."""
    question = "What colour is the square?"
    valid = good_body(max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": [
        {"type": "text", "text": question}, image_part(GOOD_PNG)]}])
    expected = reference([{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}],
                         [wide_image()])["text"]
    clients, rounds = 16, 4
    outcomes: dict = {}

    def send(client_index: int) -> None:
        for round_index in range(rounds):
            hostile = (client_index + round_index) % 2 == 1
            case = NEIGHBOURS[(client_index + round_index) % len(NEIGHBOURS)] if hostile else None
            payload = BAD_REQUESTS[case][0] if hostile else valid
            data = payload if isinstance(payload, bytes) else json.dumps(payload)
            for _ in range(20):
                response = post_raw(server, data)
                if response.status_code != 429:
                    break
                time.sleep(float(response.headers.get("retry-after", 1)))
            outcomes[client_index, round_index] = (case, response.status_code, response.json())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert len(outcomes) == clients * rounds
    for case, status, answer in outcomes.values():
        if case is None:
            assert status == 200 and answer["choices"][0]["message"]["content"] == expected, answer
        else:
            assert status == BAD_REQUESTS[case][1] and BAD_REQUESTS[case][2] in answer["error"]["message"], answer

"""The live endpoint answers two images and a video as the engine does (the video rows' path without Ray:
tests/unit/test_video_rows.py)."""
from llava_core.config import ServeSettings
from llava_core.inference.decoding import DecodingParams
from llava_core.inference.engine import GenerationEngine, GenerationRequest
from tests.video_rows_helpers import FRAMES, checked, data_url, mp4_bytes, png, video_body


def test_the_live_endpoint_answers_two_images_and_a_video_as_the_engine_does(ray_session, video_export):
    """A OneVision export on Ray Serve: a request with two images (each at base size, as OneVision trains several)
    and one with a video get 200s whose answers and prompt token counts are the engine's on the same inputs."""
    import requests

    from llava_core.serve.client import deploy, image_data_url, shutdown
    from tests.ports import free_port

    two_images = {"model": "m", "max_tokens": 5, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(png((48, 64), (200, 30, 30)))}},
        {"type": "image_url", "image_url": {"url": image_data_url(png((90, 40), (30, 30, 200)))}},
        {"type": "text", "text": "Which image is red?"}]}]}
    a_video = {**video_body(data_url(mp4_bytes())), "max_tokens": 5, "temperature": 0}
    settings = ServeSettings(port=free_port(), video_frames=FRAMES, default_max_tokens=5)
    engine = GenerationEngine(video_export, device="cpu")
    expected = []
    for body in (two_images, a_video):
        chat, images, videos = checked(body, settings)
        request = GenerationRequest(chat.template_messages(), images, DecodingParams(max_tokens=5, temperature=0),
                                    videos=videos)
        expected.append(engine.generate([request])[0])
    assert all(e.text for e in expected), "an empty answer would make the comparison prove nothing"
    url = deploy(video_export, settings, "m")
    try:
        answers = [requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
                   for body in (two_images, a_video)]
    finally:
        shutdown()
    for response, completion in zip(answers, expected):
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["choices"][0]["message"]["content"] == completion.text
        assert reply["usage"]["prompt_tokens"] == completion.prompt_tokens

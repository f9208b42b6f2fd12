"""The vendors' official SDKs against the sandbox, base URL aside: its wire shapes are theirs, for the live
models, and a retired model is refused the way each SDK expects to see it.

OpenAI's `openai` and Google's `google-genai` are installed as dev dependencies for this. (BytePlus's SDK
covers every BytePlus service and BFL's predates FLUX.2: the adapters' own tests cover those two.)
"""

from __future__ import annotations

import base64
import io

import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from openai import AsyncOpenAI, NotFoundError
from PIL import Image

from sandbox import Sandbox

# google-genai subclasses aiohttp's ClientSession when aiohttp is installed, which aiohttp warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")


def _size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


async def test_openai_sdk_generates_on_the_live_models_at_any_size(sandbox: Sandbox) -> None:
    async with AsyncOpenAI(api_key="sk-sdk", base_url=f"{sandbox.base_url}/v1", max_retries=0) as client:
        for model in ("gpt-image-2.6-sunburst", "gpt-image-2.6-flare"):
            answer = await client.images.generate(
                model=model, prompt="a shop sign", size="1088x1920", quality="xhigh", n=2
            )
            assert answer.data is not None and len(answer.data) == 2
            assert all(_size(base64.b64decode(item.b64_json or "")) == (1088, 1920) for item in answer.data)
            assert answer.usage is not None and answer.usage.output_tokens > 0
        edited = await client.images.edit(
            model="gpt-image-2.6-sunburst",
            image=[("a.png", _png(), "image/png"), ("b.png", _png(), "image/png")],
            prompt="the same sign, in blue",
        )
        assert edited.data is not None and edited.data[0].b64_json


async def test_openai_sdk_sees_a_retired_model_as_model_not_found(sandbox: Sandbox) -> None:
    async with AsyncOpenAI(api_key="sk-sdk", base_url=f"{sandbox.base_url}/v1", max_retries=0) as client:
        with pytest.raises(NotFoundError) as caught:
            await client.images.generate(model="gpt-image-1.5", prompt="a shop sign")
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    assert "gpt-image-1.5" in caught.value.message


async def test_openai_sdk_lists_models_with_their_shutdown_dates(sandbox: Sandbox) -> None:
    sandbox.openai.shutdown_dates["gpt-image-2.5-flare"] = "2027-02-01"
    async with AsyncOpenAI(api_key="sk-sdk", base_url=f"{sandbox.base_url}/v1", max_retries=0) as client:
        listed = {model.id: model async for model in client.models.list()}
    assert "gpt-image-2.6-sunburst" in listed and "gpt-image-1.5" not in listed
    # a field of the SDK's own Model type: the sandbox's answer parses as OpenAI's does
    assert str(listed["gpt-image-2.5-flare"].shutdown_date) == "2027-02-01"
    assert listed["gpt-image-2.6-sunburst"].shutdown_date is None


def _gemini(sandbox: Sandbox) -> genai.Client:
    return genai.Client(api_key="sdk-key", http_options=types.HttpOptions(base_url=sandbox.base_url))


@pytest.mark.parametrize("model", ["gemini-3.1-flash-image", "gemini-3-pro-image"])
async def test_google_genai_sdk_generates_on_the_live_models(sandbox: Sandbox, model: str) -> None:
    response = await _gemini(sandbox).aio.models.generate_content(
        model=model,
        contents="a red fox in the snow",
        config=types.GenerateContentConfig(
            response_modalities=["IMAGE"],
            image_config=types.ImageConfig(aspect_ratio="16:9", image_size="2K"),
        ),
    )
    assert response.candidates
    content = response.candidates[0].content
    assert content is not None and content.parts
    final = [part for part in content.parts if part.inline_data is not None and not part.thought][-1]
    assert final.inline_data is not None and final.inline_data.data
    assert _size(final.inline_data.data) == (2752, 1536)
    assert response.usage_metadata is not None and response.usage_metadata.candidates_token_count


async def test_google_genai_sdk_sees_a_retired_model_as_404(sandbox: Sandbox) -> None:
    with pytest.raises(genai_errors.ClientError) as caught:
        await _gemini(sandbox).aio.models.generate_content(
            model="gemini-3-pro-image-preview", contents="a fox"
        )
    assert caught.value.code == 404 and caught.value.status == "NOT_FOUND"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buffer, format="PNG")
    return buffer.getvalue()

"""Typed request and response bodies of the OpenAI chat completions API,
with the `feather` pruning extension."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class StageSettings(_Strict):
    layer: StrictInt
    keep: StrictFloat | StrictInt
    criterion: Literal["rope", "rope_free"] = "rope_free"
    grid_stride: StrictInt | None = Field(None, le=4096)


class FeatherSettings(_Strict):
    """Per-request pruning: a preset, explicit stages, or both (stages win)."""

    preset: StrictStr | None = None
    stages: list[StageSettings] | None = None
    # Also report each stage's kept image-token indices (raster order), e.g.
    # to draw kept-token maps; off by default, the lists are long.
    return_kept: StrictBool = False


MAX_STOP_SEQUENCES = 16
StopString = Annotated[StrictStr, Field(min_length=1, max_length=1000)]


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send fields we do not use (user, metadata, ...): ignore them.
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=8)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | StrictInt | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=-2**63, le=2**63 - 1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    frequency_penalty: StrictFloat | StrictInt | None = Field(None, ge=-2, le=2)
    presence_penalty: StrictFloat | StrictInt | None = Field(None, ge=-2, le=2)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    ignore_eos: StrictBool = False  # vLLM's extension, for benchmarks
    feather: FeatherSettings | None = None
    # OpenAI features this server does not implement: refused when used,
    # never silently ignored (see routes._refuse_unsupported).
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    audio: Any = None
    prediction: Any = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StageTotal(BaseModel):
    """One cut, as the engine ran it, over all the request's images."""

    layer: int
    kept: int  # image tokens kept after this cut, all images together


class StageReport(BaseModel):
    """One cut of one image."""

    layer: int
    kept: int  # this image's tokens kept after this cut
    mean_row: float | None = None  # of the kept tokens, 0 = top row, 1 = bottom
    quadrant_coverage: dict[str, float] | None = None  # fraction of each quadrant kept
    kept_indices: list[int] | None = None  # the kept image tokens, raster order (when asked for)


class KVBlocksReport(BaseModel):
    """KV-cache blocks the request held when it finished, from the engine's
    block manager, and what the same tokens hold unpruned."""

    used: int
    unpruned: int
    held_per_group: list[int]  # per KV-cache group (one group per stage of layers)


class FallbackReport(BaseModel):
    """Why a request that asked for pruning ran unpruned."""

    reason: str  # a closed set: feather_vllm.pruning.schedule.FallbackReason
    message: str


class ImageReport(BaseModel):
    """What pruning did to one image (each image keeps its own share)."""

    image_tokens: int
    stages: list[StageReport]


class FeatherReport(BaseModel):
    preset: str
    image_tokens: int  # all images together
    stages: list[StageTotal]
    images: list[ImageReport]  # in prompt order
    kv_blocks: KVBlocksReport
    fallback: FallbackReport | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class Choice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    feather: FeatherReport | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    feather: FeatherReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "feather-vllm"
    max_model_len: int | None = None  # as vLLM's server reports it (None while the engine starts)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

"""POST /tokenize and /detokenize, as vLLM has them: text (or chat messages through the chat template) to
token ids, and back. The ids are exactly what the completion endpoints would run."""
from __future__ import annotations

from .chat import messages
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .serving import BadRequest, OpenAIServing


def tokenize(s: OpenAIServing, req: TokenizeRequest) -> TokenizeResponse:
    s.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise BadRequest("give exactly one of prompt and messages", param="prompt")
    if req.prompt is not None:
        ids = s.tokenizer.encode(req.prompt)  # as /v1/completions reads it (add_special_tokens adds nothing there)
    else:
        try:
            text = s.tokenizer.apply_chat_template(
                messages(req), add_generation_prompt=req.add_generation_prompt, tools=req.tools,
                continue_final_message=req.continue_final_message, **(req.chat_template_kwargs or {}))
        except (ValueError, TypeError) as e:
            raise BadRequest(str(e), param="messages") from e
        ids = s.tokenizer.encode(text)  # the template writes the special tokens itself
    return TokenizeResponse(count=len(ids), max_model_len=s.max_model_len, tokens=ids,
                            token_strs=[s.token_str(t) for t in ids] if req.return_token_strs else None)


def detokenize(s: OpenAIServing, req: DetokenizeRequest) -> DetokenizeResponse:
    s.check_model(req.model)
    bad = [t for t in req.tokens if t >= s.engine.engine.vocab_size]
    if bad:
        raise BadRequest(f"tokens must be token ids in [0, {s.engine.engine.vocab_size}), got {bad[:8]}",
                         param="tokens")
    return DetokenizeResponse(prompt=s.tokenizer.decode(req.tokens, skip_special_tokens=False))

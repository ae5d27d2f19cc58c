"""A small OpenAI-compatible /v1/chat/completions server over a local checkpoint (tests only).

It stands in for a vLLM server: images arrive as base64 data URLs, ``n`` samples per request.
``fail_first`` makes the first N requests answer 503, to exercise the client's retries.
"""

from __future__ import annotations

import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request


def make_app(path: str, fail_first: int = 0, api_key: str | None = None) -> FastAPI:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmemb.items import load_image

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    app = FastAPI()
    app.state.requests = 0
    lock = threading.Lock()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise HTTPException(401, "bad key")
        app.state.requests += 1
        if app.state.requests <= fail_first:
            raise HTTPException(503, "warming up")
        body = await request.json()
        images, messages = [], []
        for m in body["messages"]:
            content = m["content"]
            if isinstance(content, list):
                parts = []
                for p in content:
                    if p["type"] == "image_url":
                        images.append(load_image(p["image_url"]["url"]))
                        parts.append({"type": "image"})
                    else:
                        parts.append(p)
                content = parts
            messages.append({"role": m["role"], "content": content})
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        n = int(body.get("n", 1))
        with lock, torch.no_grad():
            torch.manual_seed(0)
            out = model.generate(**inputs, do_sample=True, temperature=float(body.get("temperature", 1.0)),
                                 max_new_tokens=int(body.get("max_tokens", 16)), num_return_sequences=n,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "length"}
                            for i, t in enumerate(texts)],
                "usage": {"prompt_tokens": int(inputs["input_ids"].numel()), "completion_tokens": int(new.numel()),
                          "total_tokens": int(inputs["input_ids"].numel() + new.numel())}}

    return app


class BackgroundServer:
    """uvicorn on 127.0.0.1 in a thread, on a free port."""

    def __init__(self, app):
        self.config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

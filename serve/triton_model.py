"""The Triton Python-backend model that `ardeploy triton` repositories run (imported by their model.py).

Each instance loads the bundle into a generator and a scheduler (`build_engine`, as `ardeploy serve` does).
Decoupled (the default): `execute` hands every request to the scheduler and returns at once; a thread per
request sends one response per printable piece and a last one with the finish reason and the FINAL flag,
and cancels the request if Triton reports it cancelled (a client gone). Not decoupled: one response per
request with all of its text and tokens.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

FINISH = {"eos": "stop", "stop_string": "stop", "constraint": "stop", "max_new_tokens": "length",
          "max_seq": "length", "cancelled": "cancelled"}


class TritonPythonModel:
    def initialize(self, args):
        import json
        import triton_python_backend_utils as pb_utils
        from ardeploy.serve.engine import build_engine
        from ardeploy.serve.triton import read_parameters
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = read_parameters(config)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        bundle = Path(params.get("bundle_path") or "bundle")
        if not bundle.is_absolute():
            bundle = Path(args["model_repository"]) / args["model_version"] / bundle
        device = params.get("device") or "cpu"
        options = {"device": device}
        if device == "cuda" and args.get("model_instance_kind") == "GPU":
            options["gpu"] = int(args.get("model_instance_device_id", 0))     # Triton's GPU for this instance
        if params.get("threads"):
            options["threads"] = int(params["threads"])
        self.generator, self.scheduler = build_engine(
            str(bundle), max_batch=int(params.get("max_batch") or 0) or None,
            max_queue=int(params.get("max_queue") or 64), **options)

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                sender = request.get_response_sender()
                try:
                    handle = self.scheduler.submit(self._request(request))
                except Exception as e:                # noqa: BLE001 - the request's error, not the model's
                    sender.send(self._error(e), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                threading.Thread(target=self._stream, args=(request, sender, handle), daemon=True).start()
            return None
        handles = []
        for request in requests:
            try:
                handles.append(self.scheduler.submit(self._request(request)))
            except Exception as e:                    # noqa: BLE001
                handles.append(e)
        return [self._whole(handle) for handle in handles]

    def finalize(self):
        self.scheduler.close(drain=False)
        self.generator.close()

    # -- requests in --------------------------------------------------------------------------------
    def _request(self, request):
        from ardeploy.runtime.errors import UserError
        from ardeploy.runtime.sampling import SamplingConfig
        from ardeploy.runtime.scheduling import Request
        text, ids = self._input(request, "text_input"), self._input(request, "input_ids")
        if (text is None) == (ids is None):
            raise UserError("give exactly one of text_input or input_ids")
        if text is not None:
            text = _one_string(text, "text_input")
            chat = self._input(request, "chat")
            prompt = self.generator.encode(text, chat=bool(chat is not None and chat.reshape(-1)[0]))
        else:
            prompt = self.generator.to_ids(ids.reshape(-1).tolist())
        max_tokens = self._scalar(request, "max_tokens")
        room = self.generator.bundle.max_seq - len(prompt)
        temperature = self._scalar(request, "temperature")
        stop = self._input(request, "stop")
        sampling = SamplingConfig(
            max_new_tokens=int(max_tokens) if max_tokens is not None else max(1, room),
            greedy=temperature is not None and float(temperature) == 0,
            temperature=float(temperature) if temperature is not None else 1.0,
            top_p=float(self._scalar(request, "top_p") or 1.0),
            seed=None if self._scalar(request, "seed") is None else int(self._scalar(request, "seed")),
            stop=[] if stop is None else [_one_string(s, "stop") for s in stop.reshape(-1)])
        return Request(prompt, sampling)

    def _input(self, request, name):
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _scalar(self, request, name):
        value = self._input(request, name)
        return None if value is None or value.size == 0 else value.reshape(-1)[0].item()

    # -- responses out ------------------------------------------------------------------------------
    def _response(self, text: str, ids: list[int], finish: str = ""):
        pb = self.pb
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
            pb.Tensor("output_ids", np.array(ids, dtype=np.int64)),
            pb.Tensor("finish_reason", np.array([finish.encode()], dtype=np.object_))])

    def _error(self, e: BaseException):
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(" ".join(str(e).split())))

    def _stream(self, request, sender, handle) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            for event in handle.events():
                if getattr(request, "is_cancelled", None) and request.is_cancelled():
                    handle.cancel()
                    continue
                sender.send(self._response(event.text, [event.token]))
            reason = handle.result.stop_reason if handle.result is not None else "cancelled"
            sender.send(self._response("", [], FINISH.get(reason, reason)), flags=final)
        except Exception as e:                        # noqa: BLE001 - e.g. the client went away mid-stream
            handle.cancel()
            try:
                sender.send(self._error(e), flags=final)
            except Exception:                         # noqa: BLE001 - nobody left to tell
                pass

    def _whole(self, handle):
        if isinstance(handle, BaseException):
            return self._error(handle)
        try:
            for _ in handle.events():
                pass
        except Exception as e:                        # noqa: BLE001
            return self._error(e)
        result = handle.result
        if result is None:
            return self._response("", [], "cancelled")
        return self._response(result.text or "", result.token_ids, FINISH.get(result.stop_reason, result.stop_reason))


def _one_string(value, name: str) -> str:
    from ardeploy.runtime.errors import UserError
    item = value.reshape(-1)[0] if getattr(value, "size", 1) else b""
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{name} is not UTF-8 text") from None
    return str(item)

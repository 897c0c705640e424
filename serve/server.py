"""Run the app on uvicorn: SIGTERM / SIGINT stop taking connections, let the requests in flight finish
(up to drain_timeout seconds; those still running then are cancelled), close the scheduler and return
(`ardeploy serve` then exits with status 0)."""
from __future__ import annotations

from ardeploy.runtime.log import log

from .app import create_app
from .service import ModelService


def run_server(service: ModelService, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               drain_timeout: float = 30.0, access_log: bool = False) -> None:
    import uvicorn

    def shut_down():
        stats = service.scheduler.stats()
        log.info(f"shutting down: {stats.get('finished', 0)} requests finished, "
                 f"{stats.get('cancelled', 0)} cancelled")
        service.scheduler.close(drain=False)
        service.generator.close()

    app = create_app(service, api_key=api_key, on_shutdown=shut_down)
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", access_log=access_log,
                            log_level="info" if access_log else "warning",
                            timeout_graceful_shutdown=int(drain_timeout) if drain_timeout else None)
    server = uvicorn.Server(config)
    sock = listen(host, port)
    log.info(f"serving {service.model_name} on http://{_url_host(host)}:{sock.getsockname()[1]}/v1 "
                f"(SIGTERM or Ctrl-C: finish the requests in flight and stop)")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn re-raises the signal it drained on; the CLI turns that into "interrupted". The drain is
        # done and the scheduler closed: this is a normal end.
        if not server.should_exit:
            raise


def listen(host: str, port: int):
    """The listening socket (bound here, so that a port in use is one clear error line)."""
    import socket
    from ardeploy.runtime.errors import UserError
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

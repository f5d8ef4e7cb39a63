"""Live calibration progress as Prometheus metrics (``--metrics-port``)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Gauge, Info, start_http_server


class ProgressMetrics:
    """Gauges for stage, layer, objective, elapsed time and ETA; served over HTTP when a port is given."""

    def __init__(self, port: int | None = None, total_layers: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.start = time.time()
        self.total_layers = total_layers
        self.stage = Info("conqur_calibration_stage", "Current calibration stage", registry=self.registry)
        self.layer = Gauge("conqur_calibration_layer", "Last finished decoder layer", registry=self.registry)
        self.objective = Gauge("conqur_calibration_objective", "Latest R1 corner objective",
                               registry=self.registry)
        self.elapsed = Gauge("conqur_calibration_elapsed_seconds", "Seconds since start", registry=self.registry)
        self.eta = Gauge("conqur_calibration_eta_seconds", "Estimated seconds left in the stage",
                         registry=self.registry)
        self.server = None
        if port is not None:
            self.server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self.set_stage("start")

    def set_stage(self, name: str) -> None:
        self.stage.info({"stage": name})
        self._stage_start = time.time()
        self.elapsed.set(time.time() - self.start)

    def on_step(self, log) -> None:
        self.objective.set(log.r1_after)
        self.elapsed.set(time.time() - self.start)

    def on_layer(self, index: int, *_args) -> None:
        self.layer.set(index)
        now = time.time()
        self.elapsed.set(now - self.start)
        done = index + 1
        if self.total_layers:
            self.eta.set((now - self._stage_start) / done * (self.total_layers - done))

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()  # release the port too
            self.server = None

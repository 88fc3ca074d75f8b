"""One engine, one thread, requests first in first out.

The worker thread loads the model (and compiles and warms it up) before it reports ready, then runs one generation
at a time from a bounded queue. Each round's new text goes back to the request's event loop as a `Delta`; the last
event is a `Done` (or an `Failed`). A request whose client went away, or whose time is up, is stopped at the next
round: the engine's generator is closed and the next request's prefill starts from a clean cache.
"""
import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from fasteagle.engine import GenerationResult
from fasteagle.serve.protocol import Generation
from fasteagle.serve.stops import StopMatcher

log = logging.getLogger("fasteagle.serve")


@dataclass
class Loaded:
    """What the worker serves with: the engine and how to read its output."""

    engine: object  # fasteagle.engine.SpecEngine
    tok: object  # fasteagle.tokenizer.Tokenizer
    eos_ids: list[int]
    max_seq_len: int


@dataclass
class Delta:
    text: str
    tokens: int  # tokens generated so far


@dataclass
class Done:
    finish_reason: str  # "stop" (EOS or a stop string), "length", "cancelled", "timeout"
    prompt_tokens: int
    completion_tokens: int
    tau: float | None  # tokens per speculative round (accepted + the bonus token), None without rounds
    rounds: int
    first_token_s: float | None  # time from arrival to the first token
    inter_token_s: float | None  # mean time per token after the first


@dataclass
class Failed:
    status: int
    message: str


class QueueFull(Exception):
    pass


@dataclass
class Job:
    gen: Generation
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic()
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)

    def send(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()


class Worker:
    def __init__(self, load, max_queue: int = 64, warmup=None):
        """load() -> Loaded, run on the worker thread; then warmup(loaded), if given, before reporting ready."""
        self._load, self._warmup = load, warmup
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loaded: Loaded | None = None
        self.thread = threading.Thread(target=self._main, name="fasteagle-engine", daemon=True)
        self.on_done = None  # called with each Done (on the worker thread), e.g. to update metrics

    def start(self):
        self.thread.start()

    def stop(self):
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass

    def submit(self, job: Job):
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def _main(self):
        try:
            self.loaded = self._load()
            if self._warmup:
                self._warmup(self.loaded)
        except BaseException as e:  # reported by /health and to every request
            self.error = e
            log.error("loading the model failed: %s", e)
            return
        self.ready.set()
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            if time.monotonic() > job.deadline:
                job.send(Failed(504, "the request timed out while queued"))
                continue
            try:
                done = self._run(job)
                if self.on_done:
                    self.on_done(done)
                job.send(done)
            except Exception as e:
                log.exception("generation failed")
                job.send(Failed(500, f"generation failed: {e}"))

    def _run(self, job: Job) -> Done:
        m, g = self.loaded, job.gen
        eos = () if g.ignore_eos else m.eos_ids
        room = m.max_seq_len - len(g.prompt_ids)
        result = GenerationResult([])
        decoder = m.tok.stream() if g.chat else m.tok.stream(prefix_ids=g.prompt_ids)
        stops = StopMatcher(g.stops)
        first = last = None
        n, finish = 0, None
        rounds = m.engine.stream(g.prompt_ids, min(g.max_tokens or room, room), g.params, g.seed, eos, result)
        try:
            for new in rounds:
                last = time.perf_counter()
                first = first or last
                text, hit = "", False
                for t in new:
                    if hit:
                        break
                    n += 1
                    if t in eos:
                        break
                    shown, hit = stops.push(decoder.push(t))
                    text += shown
                if hit:
                    finish = "stop"
                elif job.cancelled.is_set():
                    finish = "cancelled"
                elif time.monotonic() > job.deadline:
                    finish = "timeout"
                if text:
                    job.send(Delta(text, n))
                if finish:
                    break
        finally:
            rounds.close()  # stops the engine here; the next prefill resets its cache
        if finish is None:
            tail, hit = stops.push(decoder.flush())
            tail += "" if hit else stops.flush()
            if tail:
                job.send(Delta(tail, n))
            finish = "stop" if hit or result.stop_reason == "eos" else "length"
        return Done(finish, len(g.prompt_ids), n, result.mean_accepted, len(result.accept_lens),
                    first - job.arrived if first else None,
                    (last - first) / (n - 1) if n > 1 else None)

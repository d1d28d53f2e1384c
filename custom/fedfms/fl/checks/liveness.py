"""Is a site still there? The server asks, so a dead site costs seconds instead of a task timeout.

NVFlare's server learns that a site is gone when the site's parent process reports that its job
process ended, or when its heartbeats stop; after ``dead_client_grace_period`` the workflow
communicator marks it disconnected (``get_client_disconnect_time``). The simulator has neither
signal: a client process that dies is noticed only by the simulator's own thread. So
:class:`SiteWatch` also asks the job process of each site that holds a task and has not answered:
an aux message on a topic no component handles. A live site answers at once (``TOPIC_UNKNOWN``,
from its aux runner, whatever its executor is doing); a dead one cannot, and its reply is a
communication error or a timeout. ``misses`` unanswered probes in a row make a site *lost*.

The sites ask the same of the server while a task runs (:mod:`fedfms.fl.executors.reporting`);
:class:`RunPresence`, a server component, answers them, saying once the run is over.

A site only holds a task while its job process runs (with the simulator's ``-t`` below the
number of sites, a site waiting for its turn has not been handed the task yet), so probing the
task holders never mistakes a waiting site for a dead one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReturnCode, Shareable, make_reply

LIVENESS_TOPIC = "fedfms.liveness"
#: Header of the server's answer: whether its run is still going (``running``) or over (``over``).
RUN_STATE = "fedfms_run_state"
#: Replies that mean nobody answered (any other reply, even "unknown topic", came from a live process).
NO_ANSWER = (ReturnCode.COMMUNICATION_ERROR, ReturnCode.TIMEOUT, ReturnCode.SERVICE_UNAVAILABLE, ReturnCode.SERVER_NOT_READY)


class SiteWatch:
    """Probes silent task holders and remembers which sites are lost, and why.

    Args:
        interval: seconds between probes of a silent site (0: never probe).
        timeout: seconds a probe waits for its answer.
        misses: unanswered probes in a row after which a site is lost.
    """

    def __init__(self, interval: float = 10.0, timeout: float = 10.0, misses: int = 2) -> None:
        if interval < 0 or timeout <= 0 or misses < 1:
            raise ValueError(f"need liveness interval >= 0, timeout > 0 and misses >= 1; got {interval}, {timeout}, {misses}")
        self.interval, self.timeout, self.misses = interval, timeout, misses
        self.lost: dict[str, str] = {}  # site -> why it is deemed gone
        self._missed: dict[str, int] = {}
        self._last_probe = 0.0

    def check(self, engine, communicator, fl_ctx: FLContext, silent: list[str]) -> dict[str, str]:
        """Sites among ``silent`` (holding a task, no answer yet) found gone by this call, with why."""
        found = {}
        for site in silent:
            if site not in self.lost and communicator.get_client_disconnect_time(site):
                found[site] = "NVFlare deemed the site disconnected (its job process ended or its heartbeats stopped)"
        due = self.interval and time.monotonic() - self._last_probe >= self.interval
        probed = [s for s in silent if s not in self.lost and s not in found]
        if due and probed:
            self._last_probe = time.monotonic()
            answers = self.probe(engine, fl_ctx, probed)
            for site in probed:
                if answers[site] is None:
                    self._missed[site] = 0
                    continue
                self._missed[site] = self._missed.get(site, 0) + 1
                if self._missed[site] >= self.misses:
                    found[site] = f"lost connection: its job process did not answer {self._missed[site]} probes of {self.timeout:g} s ({answers[site]})"
        self.lost.update(found)
        return found

    def probe(self, engine, fl_ctx: FLContext, sites: list[str]) -> dict[str, str | None]:
        """For each site: None when its job process answered, else what the server got instead."""
        replies = engine.send_aux_request(
            targets=sites, topic=LIVENESS_TOPIC, request=Shareable(), timeout=self.timeout, fl_ctx=fl_ctx, optional=True
        ) or {}
        answers = {}
        for site in sites:
            reply = replies.get(site)
            code = reply.get_return_code(ReturnCode.OK) if reply is not None else "no reply"
            answers[site] = code if reply is None or code in NO_ANSWER else None
        return answers

    def returned(self, engine, fl_ctx: FLContext) -> list[str]:
        """Lost sites whose job process answers again: they are no longer lost."""
        if not self.lost:
            return []
        back = [site for site, answer in self.probe(engine, fl_ctx, sorted(self.lost)).items() if answer is None]
        for site in back:
            self.lost.pop(site)
            self._missed.pop(site, None)
        return back


def answer_probe(topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
    """A site's answer to the server's probe: the job process is alive."""
    return make_reply(ReturnCode.OK)


class RunPresence(FLComponent):
    """Server component: answers the sites' checks that the run still goes on (``over`` after it ended).

    A simulator's server leaves its message channels open after the run ends, so "the server
    answers" alone would not tell a hung site that nobody waits for it any more.
    """

    def __init__(self) -> None:
        super().__init__()
        self.state = "running"

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            fl_ctx.get_engine().register_aux_message_handler(topic=LIVENESS_TOPIC, message_handle_func=self._answer)
        elif event_type in (EventType.ABOUT_TO_END_RUN, EventType.END_RUN):
            self.state = "over"

    def _answer(self, topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        reply = make_reply(ReturnCode.OK)
        reply.set_header(RUN_STATE, self.state)
        return reply


class WatchedTasks:
    """Mixin for a ``ModelController`` with a :class:`SiteWatch` (``self.watch``): waits for its task without waiting for lost sites.

    It notes each site as it takes the task (``self._holders``, a set the controller resets per task),
    so only sites that hold it are probed.
    """

    def _prepare_task_data(self, client_task, fl_ctx: FLContext) -> None:
        self._holders.add(client_task.client.name)
        super()._prepare_task_data(client_task, fl_ctx)

    def wait_watched(self, targets: list[str], answered: Callable[[], set[str]], on_lost: Callable[[str, str], None]) -> bool:
        """Wait until the task ends; silent holders found gone go to ``on_lost`` and, once only they are left, the task ends. False on abort."""
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                return False
            silent = sorted(self._holders - answered())
            for site, why in self.watch.check(self.engine, self.communicator, self.fl_ctx, silent).items():
                on_lost(site, why)
            if set(targets) <= answered() | set(self.watch.lost):
                self.cancel_all_tasks(fl_ctx=self.fl_ctx)  # only lost sites were left to wait for
            time.sleep(self._task_check_period)
        return True

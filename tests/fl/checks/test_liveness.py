"""SiteWatch's judgement from the replies it gets (the fault drills run it against real dead and hung sites)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReturnCode, make_reply

from fedfms.fl.checks.liveness import RUN_STATE, RunPresence, SiteWatch


class Replies:
    """A stand-in engine whose sites answer as told: a return code per site, or nothing."""

    def __init__(self, codes: dict) -> None:
        self.codes, self.asked = codes, []

    def send_aux_request(self, targets, topic, request, timeout, fl_ctx, optional=False):
        self.asked.append(list(targets))
        return {site: make_reply(self.codes[site]) for site in targets if self.codes.get(site) is not None}


NOT_DISCONNECTED = SimpleNamespace(get_client_disconnect_time=lambda site: None)


def test_a_silent_site_is_lost_after_its_probes_go_unanswered():
    engine = Replies({"site-1": ReturnCode.COMMUNICATION_ERROR, "site-2": ReturnCode.OK, "site-3": None})
    watch = SiteWatch(interval=0.001, timeout=1, misses=2)
    assert watch.check(engine, NOT_DISCONNECTED, FLContext(), ["site-1", "site-2", "site-3"]) == {}  # one miss each
    time.sleep(0.01)  # the next probe is due
    found = watch.check(engine, NOT_DISCONNECTED, FLContext(), ["site-1", "site-2", "site-3"])
    assert sorted(found) == ["site-1", "site-3"] and "did not answer 2 probes of 1 s (COMMUNICATION_ERROR)" in found["site-1"]
    assert "(no reply)" in found["site-3"] and sorted(watch.lost) == ["site-1", "site-3"]
    engine.codes["site-1"] = ReturnCode.TOPIC_UNKNOWN  # a live process answers, whatever it says
    assert watch.returned(engine, FLContext()) == ["site-1"] and list(watch.lost) == ["site-3"]


def test_nvflare_s_own_dead_client_report_counts_at_once_and_probes_wait_their_interval():
    engine = Replies({"site-1": ReturnCode.OK})
    disconnected = SimpleNamespace(get_client_disconnect_time=lambda site: 12.0 if site == "site-2" else None)
    watch = SiteWatch(interval=3600, timeout=1, misses=1)
    found = watch.check(engine, disconnected, FLContext(), ["site-1", "site-2"])
    assert list(found) == ["site-2"] and "NVFlare deemed the site disconnected" in found["site-2"]
    watch.check(engine, disconnected, FLContext(), ["site-1"])
    assert engine.asked == [["site-1"]]  # the second check came before the interval: no new probe


def test_the_server_says_when_its_run_is_over():
    presence = RunPresence()
    assert presence._answer("topic", make_reply(ReturnCode.OK), FLContext()).get_header(RUN_STATE) == "running"
    presence.handle_event(EventType.ABOUT_TO_END_RUN, FLContext())
    assert presence._answer("topic", make_reply(ReturnCode.OK), FLContext()).get_header(RUN_STATE) == "over"

"""The simulated SMSC, driven by smpplib's own client over loopback SMPP 3.4."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from smpplib import consts, exceptions, smpp
from smpplib.client import Client, SimpleSequenceGenerator

from carriers.catalog import load_catalog
from carriers.smpp.dlr import Receipt, message_id_keys, receipt_from_pdu
from carriers.smpp.encoding import encode
from carriers.smsc.server import (
    ESME_RINVDSTADR,
    ESME_RSYSERR,
    ESME_RTHROTTLED,
    Fate,
    PlannedReceipt,
    SimulatedSMSC,
    Submission,
    deliver_after,
)
from carriers.smsc.simclock import SimClock
from experiments.smsc_world import world_behaviour
from experiments.world import ScenarioSpec, World

NUMBER = "447700900123"
T0 = 1_793_613_600.0  # 2026-11-02T10:00:00Z


class Esme:
    """An smpplib client bound to a simulated SMSC, collecting what it receives."""

    def __init__(self, smsc: SimulatedSMSC, mode: str = "trx", password: str = "secret") -> None:
        self.client = Client("127.0.0.1", smsc.port, timeout=0.1, allow_unknown_opt_params=True)
        self.client.connect()
        self.client._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.delivered: list[Any] = []
        self.answers: list[Any] = []
        # smpplib calls handlers with pdu=...; a handler returning None acknowledges a deliver_sm
        self.client.set_message_received_handler(lambda pdu: self.delivered.append(pdu))
        self.client.set_message_sent_handler(lambda pdu: self.answers.append(pdu))
        self.client.set_error_pdu_handler(lambda pdu: None)  # throttling is not an exception
        kind = {"tx": "transmitter", "rx": "receiver", "trx": "transceiver"}[mode]
        getattr(self.client, f"bind_{kind}")(system_id=smsc.system_id, password=password)

    def submit(self, text: bytes = b"Your code is 123456", to: str = NUMBER, **fields: Any) -> None:
        self.client.send_message(
            source_addr="Acme",
            destination_addr=to,
            short_message=text,
            registered_delivery=1,
            **fields,
        )

    def read_until(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out waiting for the SMSC"
            self.client.read_once()

    def receipts(self) -> list[Receipt]:
        return [r for r in map(receipt_from_pdu, self.delivered) if r is not None]

    def close(self) -> None:
        with contextlib.suppress(exceptions.ConnectionError, exceptions.PDUError, OSError):
            self.client.unbind()
        self.client.disconnect()


@pytest.fixture
def smscs() -> Iterator[list[SimulatedSMSC]]:
    """SMSCs started by a test, stopped after it; no thread may outlive them."""
    started: list[SimulatedSMSC] = []
    before = {t.name for t in threading.enumerate()}
    yield started
    for smsc in started:
        smsc.stop()
    leftover = {t.name for t in threading.enumerate()} - before
    assert not {name for name in leftover if name.startswith("smsc-")}


def run(smscs: list[SimulatedSMSC], carrier: str, behaviour: Any, **options: Any) -> SimulatedSMSC:
    smsc = SimulatedSMSC(carrier, behaviour, **options).start()
    smscs.append(smsc)
    return smsc


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_bind_enquire_link_unbind(smscs: list[SimulatedSMSC]) -> None:
    smsc = run(smscs, "c1", deliver_after(1.0))
    esme = Esme(smsc)
    esme.client.send_pdu(smpp.make_pdu("enquire_link", client=esme.client))
    answer = esme.client.read_pdu()
    assert (answer.command, answer.status) == ("enquire_link_resp", consts.SMPP_ESME_ROK)
    assert smsc.bound_sessions == 1
    assert esme.client.unbind().command == "unbind_resp"
    with pytest.raises(exceptions.ConnectionError):
        esme.client.read_pdu()  # the SMSC closes after unbind_resp
    esme.client.disconnect()
    wait_for(lambda: smsc.bound_sessions == 0)
    assert smsc.counters.binds == 1


def test_bad_password_is_refused(smscs: list[SimulatedSMSC]) -> None:
    smsc = run(smscs, "c1", deliver_after(1.0))
    with pytest.raises(exceptions.PDUError) as refused:
        Esme(smsc, password="wrong")
    assert refused.value.args[1] == consts.SMPP_ESME_RINVPASWD
    assert smsc.counters.bind_failures == 1 and smsc.bound_sessions == 0


def test_receipt_dates_are_appendix_b_minutes_by_default(smscs: list[SimulatedSMSC]) -> None:
    """Like most carriers: YYMMDDhhmm, so the receipt's dates carry no seconds."""
    smsc = run(smscs, "c1", deliver_after(2.0), clock=SimClock(T0 + 30, speed=100))
    esme = Esme(smsc)
    esme.submit()
    esme.read_until(lambda: esme.receipts())
    (receipt,) = esme.receipts()
    assert receipt.date_precision_s == 60.0
    assert receipt.done_date.second == 0 and T0 <= receipt.done_date.timestamp() <= T0 + 120


def test_submit_answer_and_receipt(smscs: list[SimulatedSMSC]) -> None:
    smsc = run(
        smscs, "c1", deliver_after(2.0), clock=SimClock(T0, speed=100), receipt_date_seconds=True
    )
    esme = Esme(smsc)
    esme.submit()
    esme.read_until(lambda: esme.answers and esme.receipts())
    message_id = esme.answers[0].message_id.decode()
    (receipt,) = esme.receipts()
    assert receipt.message_id == message_id and receipt.status == "DELIVRD" and receipt.final
    assert receipt.error_code == "000"
    assert receipt.done_date - receipt.submit_date == timedelta(seconds=2)
    assert T0 <= receipt.submit_date.timestamp() < T0 + 60
    pdu = esme.delivered[0]
    assert pdu.esm_class == 0x04 and pdu.source_addr.decode() == NUMBER
    wait_for(lambda: smsc.counters.receipts_acked == 1)
    esme.close()
    assert smsc.counters.accepted == smsc.counters.parts == smsc.counters.messages == 1


def test_receipt_on_another_bind_after_it_binds(smscs: list[SimulatedSMSC]) -> None:
    """Hex ids in submit_sm_resp, decimal in the receipt, a receiver that binds only later."""
    clock = SimClock(T0, speed=50)
    smsc = run(smscs, "c1", deliver_after(1.0), clock=clock, id_format="hex")
    smsc.receipt_id_format = "dec-padded"
    tx = Esme(smsc, mode="tx")
    tx.submit()
    tx.read_until(lambda: bool(tx.answers))
    wait_for(lambda: clock.now() > T0 + 5)
    assert smsc.pending_receipts == 1 and smsc.counters.receipts_sent == 0  # kept, no receiver
    rx = Esme(smsc, mode="rx")
    rx.read_until(lambda: bool(rx.receipts()))
    sent_id = tx.answers[0].message_id.decode()
    (receipt,) = rx.receipts()
    assert receipt.message_id != sent_id
    assert set(message_id_keys(sent_id)) & set(message_id_keys(receipt.message_id))
    assert tx.delivered == []
    tx.close()
    rx.close()


def test_throttling_answers_rthrottled(smscs: list[SimulatedSMSC]) -> None:
    smsc = run(smscs, "c1", deliver_after(1.0), max_tps=5)
    esme = Esme(smsc)
    for _ in range(20):
        esme.submit()
    esme.read_until(lambda: len(esme.answers) == 20)
    statuses = [a.status for a in esme.answers]
    assert statuses.count(ESME_RTHROTTLED) == smsc.counters.throttled >= 10
    assert statuses.count(consts.SMPP_ESME_ROK) == smsc.counters.accepted >= 5
    esme.close()


def test_kill_refuses_then_restart_delivers_kept_receipts(smscs: list[SimulatedSMSC]) -> None:
    smsc = run(smscs, "c1", deliver_after(0.5))
    esme = Esme(smsc)
    esme.submit()
    esme.read_until(lambda: bool(esme.answers))
    smsc.kill()
    with pytest.raises(exceptions.ConnectionError):
        esme.read_until(lambda: False, timeout=5)
    esme.client.disconnect()
    probe = Client("127.0.0.1", smsc.port, timeout=1, allow_unknown_opt_params=True)
    with pytest.raises(exceptions.ConnectionError):
        probe.connect()
    probe.disconnect()
    smsc.restart()
    again = Esme(smsc)
    again.read_until(lambda: bool(again.receipts()))
    again.submit()
    again.read_until(lambda: len(again.answers) == 1 and len(again.receipts()) == 2)
    assert again.receipts()[0].message_id == esme.answers[0].message_id.decode()
    again.close()


def test_unacknowledged_receipt_is_resent(smscs: list[SimulatedSMSC]) -> None:
    smsc = run(smscs, "c1", deliver_after(0.0), receipt_ack_timeout=0.3)
    esme = Esme(smsc)
    esme.submit()
    pdus = []
    while len(pdus) < 2:  # read without answering deliver_sm
        pdu = _read(esme.client)
        if pdu.command == "deliver_sm":
            pdus.append(pdu)
    first, second = (receipt_from_pdu(p) for p in pdus)
    assert first == second and pdus[0].sequence != pdus[1].sequence
    assert smsc.counters.receipts_resent >= 1 and smsc.counters.receipts_acked == 0
    # the next resend is answered by smpplib's handler
    esme.read_until(lambda: smsc.counters.receipts_acked == 1)
    esme.close()


def _read(client: Client, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.read_pdu()
        except TimeoutError:
            assert time.monotonic() < deadline, "timed out"


def test_three_part_message_counts_three_parts(smscs: list[SimulatedSMSC]) -> None:
    seen: list[Submission] = []

    def behaviour(sub: Submission) -> Fate:
        seen.append(sub)
        return Fate.accept(PlannedReceipt(0.0, "DELIVRD"))

    smsc = run(smscs, "c1", behaviour)
    esme = Esme(smsc)
    message = encode("An OTP with a long explanation. " * 12)
    assert len(message.parts) == 3
    for part in message.parts:
        esme.submit(part, esm_class=message.esm_class, data_coding=message.data_coding)
    esme.read_until(lambda: len(esme.answers) == 3 and len(esme.receipts()) == 3)
    assert smsc.counters.parts == 3 and smsc.counters.messages == 1
    assert [(s.parts, s.destination) for s in seen] == [(3, NUMBER)]
    ids = {a.message_id.decode() for a in esme.answers}
    assert {r.message_id for r in esme.receipts()} == ids and len(ids) == 3
    esme.close()


def test_event_time_runs_faster_than_wall_time(smscs: list[SimulatedSMSC]) -> None:
    """At speed 600 a receipt 30 event seconds later comes within a fraction of a second."""
    smsc = run(
        smscs, "c1", deliver_after(30.0), clock=SimClock(T0, speed=600), receipt_date_seconds=True
    )
    esme = Esme(smsc)
    start = time.monotonic()
    esme.submit()
    esme.read_until(lambda: bool(esme.receipts()), timeout=10)
    elapsed = time.monotonic() - start
    (receipt,) = esme.receipts()
    assert receipt.done_date - receipt.submit_date == timedelta(seconds=30)
    assert elapsed < 10  # 30 s at speed 1
    print(f"receipt 30 event-s later arrived after {elapsed:.3f} wall-s")
    esme.close()


def test_faults_errors_and_dropped_sessions(smscs: list[SimulatedSMSC]) -> None:
    smsc = run(smscs, "c1", deliver_after(1.0), drop_every=4)
    smsc.fail_next(1, ESME_RSYSERR)
    smsc.fail_next(1, ESME_RINVDSTADR)
    esme = Esme(smsc)
    for _ in range(3):
        esme.submit()
    esme.read_until(lambda: len(esme.answers) == 3)
    assert [a.status for a in esme.answers] == [ESME_RSYSERR, ESME_RINVDSTADR, 0]
    esme.submit()  # the 4th: the session is dropped, unanswered
    with pytest.raises(exceptions.ConnectionError):
        esme.read_until(lambda: False, timeout=5)
    esme.client.disconnect()
    assert smsc.counters.dropped_sessions == 1 and smsc.counters.rejected == 2


def test_garbage_gets_generic_nack_and_unbound_submit_is_refused(
    smscs: list[SimulatedSMSC],
) -> None:
    smsc = run(smscs, "c1", deliver_after(1.0))
    with socket.create_connection(("127.0.0.1", smsc.port), timeout=5) as sock:
        sock.sendall(struct.pack(">LLLL", 16, 0x0000_0099, 0, 7))
        assert struct.unpack(">LLLL", _recv(sock, 16)) == (16, 0x8000_0000, 3, 7)
        enquire = smpp.make_pdu("enquire_link", client=SimpleSequenceGenerator())
        sock.sendall(enquire.generate())  # a valid PDU still works after the garbage
        assert struct.unpack(">LLLL", _recv(sock, 16))[1] == 0x8000_0015
    client = Client("127.0.0.1", smsc.port, timeout=5, allow_unknown_opt_params=True)
    client.connect()
    client.state = consts.SMPP_CLIENT_STATE_BOUND_TX  # lie, to send a submit unbound
    client.send_message(source_addr="Acme", destination_addr=NUMBER, short_message=b"x")
    answer = client.read_pdu()
    assert (answer.command, answer.status) == ("submit_sm_resp", consts.SMPP_ESME_RINVBNDSTS)
    client.disconnect()
    assert smsc.counters.generic_nacks == 1


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def test_world_behaviour_and_several_smscs(smscs: list[SimulatedSMSC]) -> None:
    """Two carriers from the simulator world at once: receipts as the world says, truth kept."""
    catalog = load_catalog()
    spec = {
        "name": "smsc",
        "seed": 5,
        "start": "2026-11-02T10:00:00Z",
        "duration_minutes": 10,
        "traffic": {"rate_per_second": 1, "countries": {"DE": 1.0}},
        "defaults": {"deliver": 1.0, "latency_median_s": 5, "no_dlr": 0.0},
        "routes": {"eurodirect": {"DE": {"deliver": 0.0, "no_dlr": 0.0}}},
    }
    world = World(ScenarioSpec.model_validate(spec), catalog)
    number = world.numbers["DE"][0][0].lstrip("+")
    clock = SimClock(world.start, speed=7200)
    conversions: list[tuple[str, float]] = []
    good = world_behaviour(
        world,
        "globalprime",
        np.random.default_rng(1),
        tenant="acme",
        on_conversion=lambda mid, at: conversions.append((mid, at)),
    )
    bad = world_behaviour(world, "eurodirect", np.random.default_rng(2))
    a = run(smscs, "globalprime", good, clock=clock)
    b = run(smscs, "eurodirect", bad, clock=clock, id_format="hex")
    esmes = [Esme(a), Esme(b)]
    for esme in esmes:
        for _ in range(3):
            esme.submit(b"123456", to=number)
    for esme in esmes:
        esme.read_until(lambda e=esme: len(e.receipts()) == 3, timeout=15)
    good_ids = [x.message_id.decode() for x in esmes[0].answers]
    assert {r.status for r in esmes[0].receipts()} == {"DELIVRD"}
    assert all(good.truths[m].delivered for m in good_ids)
    assert {r.status for r in esmes[1].receipts()} <= {"UNDELIV", "EXPIRED"}
    assert not any(t.delivered for t in bad.truths.values()) and len(bad.truths) == 3
    assert {m for m, _ in conversions} <= set(good_ids) and conversions
    for esme in esmes:
        esme.close()


def test_message_payload_parts_and_submit_window(smscs: list[SimulatedSMSC]) -> None:
    """A long text in message_payload counts its parts; a full window answers RTHROTTLED."""
    smsc = run(smscs, "c1", deliver_after(1.0), window=2, submit_resp_delay=0.2)
    esme = Esme(smsc)
    esme.client.send_message(
        source_addr="Acme",
        destination_addr=NUMBER,
        message_payload=b"x" * 400,  # 3 parts of 153 septets
        registered_delivery=1,
    )
    for _ in range(2):
        esme.submit()
    esme.read_until(lambda: len(esme.answers) == 3)
    assert [a.status for a in esme.answers] == [ESME_RTHROTTLED, 0, 0]  # the refusal is at once
    assert smsc.counters.parts == 4 and smsc.counters.accepted == 2
    esme.close()


def test_receipt_may_come_before_its_submit_answer(smscs: list[SimulatedSMSC]) -> None:
    smsc = run(smscs, "c1", deliver_after(0.0), receipt_first=True, part_receipts="last")
    esme = Esme(smsc)
    esme.submit()
    first, second = _read(esme.client), _read(esme.client)
    assert (first.command, second.command) == ("deliver_sm", "submit_sm_resp")
    assert receipt_from_pdu(first).message_id == second.message_id.decode()  # type: ignore[union-attr]
    esme.close()


def test_receipt_as_data_sm(smscs: list[SimulatedSMSC]) -> None:
    smsc = run(smscs, "c1", deliver_after(0.0, "UNDELIV", "034"), receipt_pdu="data_sm")
    esme = Esme(smsc)
    esme.submit()
    pdus = [_read(esme.client), _read(esme.client)]
    (data_sm,) = [p for p in pdus if p.command == "data_sm"]
    (answer,) = [p for p in pdus if p.command == "submit_sm_resp"]
    receipt = receipt_from_pdu(data_sm)
    assert receipt is not None
    assert (receipt.message_id, receipt.status, receipt.error_code) == (
        answer.message_id.decode(),
        "UNDELIV",
        "034",
    )
    assert receipt.done_date is not None  # the text rode in message_payload
    resp = smpp.make_pdu("data_sm_resp", client=esme.client, message_id="")
    resp.sequence = data_sm.sequence
    esme.client.send_pdu(resp)  # smpplib's own loop leaves data_sm unanswered
    wait_for(lambda: smsc.counters.receipts_acked == 1)
    esme.close()

"""The refresh core through broker.core.interfaces, on fakes: every branch of the locked refresh and the write-back,
and failures staged at each await. No sockets; the integration tests are the proof."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
import weakref
from dataclasses import dataclass, replace
from datetime import timedelta

import pytest

from broker.core.circuit import CircuitBreaker
from broker.core.interfaces import GuardedIdp, NullObserver
from broker.core.refresh import Refresher, RefreshSettings
from broker.core.refresh.guarded import GuardedIdentityProvider, NullIdentityProvider
from broker.core.refresh.liveness import Liveness
from broker.core.refresh.parts import RefreshParts
from broker.core.refresh.rejections import RejectedTokens
from broker.core.refresh.writeback import Pending, WriteBack
from broker.core.tokens import TokenService
from broker.errors import IdpOutcomeUnknown, IdpRejected, IdpUnavailable
from broker.model import Link, Secret, TokenResult, TokenStatus
from tests.support.fakes import Answer, FakeClock, FakeStore, RotatingIdp, ScriptedIdp, link, tokens

SETTINGS = RefreshSettings(
    leeway=timedelta(seconds=600),
    refresh_ahead=timedelta(0),
    lock_timeout=1.0,
    idp_timeout=1.0,
    reauth_backoff=60.0,
    forced_interval=30.0,
    persist_warn_after=30.0,
    store_timeout=1.0,
    max_concurrent=4,
    heartbeat_interval=0.01,
    holder_dead_after=2.0,
)


@dataclass
class Core:
    clock: FakeClock
    store: FakeStore
    idp: ScriptedIdp
    refresher: Refresher
    writeback: WriteBack
    liveness: Liveness
    tokens: TokenService
    user: uuid.UUID

    async def get(self, budget: float = 5.0) -> TokenResult:
        return await self.tokens.get_token(self.user, budget)

    async def refresh(self) -> TokenResult:
        row = self.store.rows[self.user]
        return await self.refresher.refresh(row, time.monotonic() + 5)

    def row_refresh(self) -> str:
        return self.store.rows[self.user].refresh_token.reveal()

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0.01)
            if not len(self.writeback):
                return


def make_core(*answers: Answer, expired: bool = True, idp: GuardedIdp | None = None) -> Core:
    clock = FakeClock()
    store = FakeStore(clock)
    user = uuid.uuid4()
    expiry = clock.now() - timedelta(seconds=1) if expired else clock.now() + timedelta(hours=1)
    store.put(link(user, 0, expiry))
    scripted = ScriptedIdp(*answers)
    liveness = Liveness(store, SETTINGS.heartbeat_interval)
    writeback = WriteBack(
        store, liveness, NullObserver(), store_timeout=1.0, warn_after=SETTINGS.persist_warn_after, clock=clock.now
    )
    guarded = idp or GuardedIdentityProvider(scripted, CircuitBreaker(3, 10.0, clock=clock.monotonic), NullObserver())
    rejected = RejectedTokens(60.0, clock=clock.monotonic)
    refresher = Refresher(
        RefreshParts(store, guarded, SETTINGS, writeback, liveness, rejected, NullObserver(), clock=clock.now)
    )
    service = TokenService(store, refresher, writeback, SETTINGS, clock=clock.now)
    return Core(clock, store, scripted, refresher, writeback, liveness, service, user)


class TestLockedRefresh:
    async def test_refreshes_writes_back_and_lifts_the_marker(self) -> None:
        c = make_core(tokens(1, FakeClock()))
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REFRESHED, "access-1")
        assert c.row_refresh() == "refresh-1"
        assert c.store.markers == {}
        assert not c.liveness.holds(c.user)
        assert [s.reveal() for s in c.idp.sent] == ["refresh-0"]

    async def test_a_row_changed_while_waiting_for_the_lock_is_served_without_the_idp(self) -> None:
        c = make_core()
        seen = c.store.rows[c.user]
        c.store.put(link(c.user, 5, c.clock.now() + timedelta(hours=1)))  # another replica refreshed
        r = await c.refresher.refresh(seen, time.monotonic() + 5)
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REFRESHED, "access-5")
        assert c.idp.sent == []

    async def test_no_link_and_disabled_account_under_the_lock(self) -> None:
        c = make_core()
        seen = c.store.rows.pop(c.user)
        assert (await c.refresher.refresh(seen, time.monotonic() + 5)).status is TokenStatus.NO_LINK
        from broker.model import AccountState

        c.store.put(replace(seen, account=AccountState.DISABLED))
        assert (await c.refresher.refresh(seen, time.monotonic() + 5)).status is TokenStatus.ACCOUNT_DISABLED
        assert c.idp.sent == []

    async def test_invalid_grant_is_recorded_and_never_sent_again_until_the_link_changes(self) -> None:
        c = make_core(IdpRejected("invalid_grant"))
        assert (await c.get()).status is TokenStatus.REAUTH_REQUIRED
        assert (await c.get()).status is TokenStatus.REAUTH_REQUIRED
        assert len(c.idp.sent) == 1
        assert c.store.markers == {}  # a rejection did not rotate: the marker is lifted
        c.clock.advance(61)
        assert (await c.get()).status is TokenStatus.REAUTH_REQUIRED
        assert len(c.idp.sent) == 1  # past the back-off too: the state is recorded, not just remembered
        assert c.store.link_events == [("link.reauth_required", c.user)]

    async def test_invalid_client_is_remembered_for_the_back_off_only_and_records_nothing(self) -> None:
        c = make_core(IdpRejected("invalid_client"))
        assert (await c.get()).status is TokenStatus.REAUTH_REQUIRED
        assert (await c.get()).status is TokenStatus.REAUTH_REQUIRED
        assert len(c.idp.sent) == 1
        c.clock.advance(61)
        c.idp.script.append(IdpRejected("invalid_client"))
        assert (await c.get()).status is TokenStatus.REAUTH_REQUIRED
        assert len(c.idp.sent) == 2  # the back-off ended
        assert c.store.link_events == []
        assert c.store.states == {}

    async def test_rotation_between_the_read_and_the_rejection_uses_the_new_state(self) -> None:
        c = make_core()

        async def rotate_then_reject(_: Secret) -> object:
            c.store.put(link(c.user, 7, c.clock.now() + timedelta(hours=1)))
            raise IdpRejected("invalid_grant")

        c.idp.script.append(rotate_then_reject)  # type: ignore[arg-type]  # raises, never returns
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.VALID, "access-7")

    async def test_an_outage_lifts_the_marker_and_falls_back(self) -> None:
        c = make_core(IdpUnavailable("down"))
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.IDP_UNAVAILABLE, "")
        assert c.store.markers == {}

    async def test_an_unknown_outcome_keeps_the_marker_until_its_heartbeat_dies(self) -> None:
        c = make_core(IdpOutcomeUnknown("timed out after sending"), tokens(2, FakeClock()))
        assert (await c.get()).status is TokenStatus.IDP_UNAVAILABLE
        assert c.user in c.store.markers
        # Within the liveness window nobody sends the token again.
        assert (await c.get()).status is TokenStatus.IDP_UNAVAILABLE
        assert len(c.idp.sent) == 1
        # The holder's heartbeat is dead: the marker is taken over and the token sent exactly once more.
        c.clock.advance(SETTINGS.holder_dead_after + 0.1)
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REFRESHED, "access-2")
        assert len(c.idp.sent) == 2

    async def test_a_live_holder_elsewhere_is_respected(self) -> None:
        c = make_core()
        from tests.support.fakes import Marker, _sha

        c.store.markers[c.user] = Marker(_sha(Secret("refresh-0")), c.clock.monotonic())
        assert (await c.get()).status is TokenStatus.IDP_UNAVAILABLE
        assert c.idp.sent == []

    async def test_no_refresh_token_or_no_idp(self) -> None:
        c = make_core(idp=NullIdentityProvider())
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.EXPIRED, "")
        assert c.store.events == []  # no lock taken


class TestRotatedTokensAreNeverLost:
    async def test_a_save_that_fails_after_the_idp_answered_is_retried(self) -> None:
        c = make_core(tokens(1, FakeClock()))
        c.store.faults.save_in_lock = 1
        c.store.faults.save_refreshed = 2
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REFRESHED, "access-1")
        assert c.liveness.holds(c.user)  # the marker stays alive while the tokens wait
        await c.settle()
        assert c.row_refresh() == "refresh-1"
        assert c.store.markers == {}
        assert not c.liveness.holds(c.user)

    async def test_a_commit_that_fails_is_retried(self) -> None:
        c = make_core(tokens(1, FakeClock()))
        c.store.faults.commit = 1
        assert (await c.get()).status is TokenStatus.REFRESHED
        await c.settle()
        assert c.row_refresh() == "refresh-1"

    async def test_pending_tokens_are_served_while_the_database_is_down(self) -> None:
        c = make_core(tokens(1, FakeClock()))
        c.store.faults.commit = 1
        c.store.faults.save_refreshed = 1000
        await c.get()
        c.store.faults.get = 1
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REFRESHED, "access-1")

    async def test_expired_pending_tokens_are_landed_before_any_refresh_never_the_consumed_token(self) -> None:
        c = make_core(tokens(1, FakeClock(), lifetime=60), tokens(2, FakeClock()))
        c.store.faults.commit = 1
        c.store.faults.save_refreshed = 1000
        assert (await c.get()).status is TokenStatus.REFRESHED
        c.clock.advance(120)  # the pending access token expired; the row still holds refresh-0 (consumed)
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.STORE_UNAVAILABLE, "")
        assert [s.reveal() for s in c.idp.sent] == ["refresh-0"]  # refresh-0 was never sent again
        c.store.faults.save_refreshed = 0
        r = await c.get()
        assert r.status is TokenStatus.REFRESHED
        assert [s.reveal() for s in c.idp.sent] == ["refresh-0", "refresh-1"]
        assert c.row_refresh() == "refresh-2"

    async def test_pending_tokens_are_dropped_after_a_new_login(self) -> None:
        c = make_core(tokens(1, FakeClock()))
        c.store.faults.commit = 1
        c.store.faults.save_refreshed = 1000
        await c.get()
        c.store.put(link(c.user, 9, c.clock.now() + timedelta(hours=1)))  # the user logged in again
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.VALID, "access-9")
        assert len(c.writeback) == 0
        assert not c.liveness.holds(c.user)

    async def test_drain_gives_pending_tokens_a_last_attempt(self) -> None:
        c = make_core(tokens(1, FakeClock()))
        c.store.faults.commit = 1
        c.store.faults.save_refreshed = 1000
        await c.get()
        c.store.faults.save_refreshed = 0
        await c.refresher.drain(1.0)
        assert c.row_refresh() == "refresh-1"
        assert len(c.writeback) == 0

    @pytest.mark.parametrize("step", range(10))
    async def test_cancellation_at_each_await_loses_nothing(self, step: int) -> None:
        """Cancel the flight (as shutdown does) after `step` scheduler turns: a rotated token is in the row or held
        for write-back, and the consumed token is never sent again."""
        c = make_core(tokens(1, FakeClock()), tokens(2, FakeClock()))
        c.refresher.refresh_ahead(c.store.rows[c.user])
        (flight,) = [t for t in asyncio.all_tasks() if t.get_name() == f"refresh:{c.user}"]
        for _ in range(step):
            await asyncio.sleep(0)
        flight.cancel()
        await asyncio.gather(flight, return_exceptions=True)
        answered = c.writeback.pending(c.user) is not None or c.row_refresh() != "refresh-0"
        if c.idp.sent and not answered:
            # Sent with no answer (unknown outcome): the marker stays, so nobody resends while it beats.
            assert c.user in c.store.markers, c.store.events
        await c.settle()
        await c.get()  # within the liveness window: nothing is resent
        assert [s.reveal() for s in c.idp.sent].count("refresh-0") <= 1
        c.clock.advance(SETTINGS.holder_dead_after + 1)
        r = await c.get()
        sent = [s.reveal() for s in c.idp.sent]
        # A rotated token that came back is never traded for a resend; an unknown outcome is resent once, after
        # its marker died (what an IdP with a rotation grace accepts).
        assert sent.count("refresh-0") == (1 if answered else min(len(sent), 2)), (step, sent)
        assert r.status in (TokenStatus.REFRESHED, TokenStatus.VALID), (step, sent, c.store.events)


class TestBudget:
    async def test_the_read_and_the_refresh_share_one_budget(self) -> None:
        c = make_core()

        async def slow(_: Secret) -> object:
            await asyncio.sleep(2)
            return tokens(1, c.clock)

        c.idp.script.append(slow)  # type: ignore[arg-type]
        original = c.store.get_link

        async def slow_read(user_id: uuid.UUID, *, timeout: float) -> object:
            await asyncio.sleep(0.3)
            return await original(user_id, timeout=timeout)

        c.store.get_link = slow_read  # type: ignore[assignment,method-assign]
        started = time.monotonic()
        r = await c.get(budget=0.5)
        assert time.monotonic() - started < 0.7
        assert r.status is TokenStatus.IDP_UNAVAILABLE


class TestLeeway:
    async def test_a_short_lived_token_is_not_refreshed_on_every_request(self) -> None:
        clock = FakeClock()
        c = make_core(tokens(1, clock, lifetime=300), tokens(2, clock, lifetime=300))
        await c.get()
        for _ in range(5):
            c.clock.advance(10)
            assert (await c.get()).status is TokenStatus.VALID
        assert len(c.idp.sent) == 1


class TestGuardedIdp:
    async def test_a_probe_that_is_cancelled_or_crashes_frees_the_circuit(self) -> None:
        clock = FakeClock()
        circuit = CircuitBreaker(1, 10.0, clock=clock.monotonic)

        async def hang(_: Secret) -> object:
            await asyncio.sleep(10)
            raise AssertionError

        idp = ScriptedIdp(IdpUnavailable("down"), hang, RuntimeError("bug"), tokens(1, clock))  # type: ignore[arg-type]
        guarded = GuardedIdentityProvider(idp, circuit, NullObserver())
        with pytest.raises(IdpUnavailable):
            await guarded.refresh(Secret("r"))
        assert guarded.refusal() is not None
        clock.advance(11)
        probe = asyncio.create_task(guarded.refresh(Secret("r")))
        await asyncio.sleep(0.01)
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)
        assert guarded.refusal() is None  # the probe was given back
        with pytest.raises(RuntimeError):
            await guarded.refresh(Secret("r"))
        clock.advance(11)
        assert (await guarded.refresh(Secret("r"))).access_token.reveal() == "access-1"

    async def test_retry_after_keeps_the_circuit_open(self) -> None:
        clock = FakeClock()
        circuit = CircuitBreaker(5, 1.0, clock=clock.monotonic)
        guarded = GuardedIdentityProvider(ScriptedIdp(IdpUnavailable("429", retry_after=30)), circuit, NullObserver())
        with pytest.raises(IdpUnavailable):
            await guarded.refresh(Secret("r"))
        clock.advance(29)
        assert guarded.refusal() is not None
        clock.advance(2)
        assert guarded.refusal() is None


class TestRejectedTokens:
    def test_remembers_for_the_backoff_and_stays_bounded(self) -> None:
        clock = FakeClock()
        memory = RejectedTokens(60.0, clock=clock.monotonic, limit=3)
        for i in range(5):
            memory.remember(Secret(f"t{i}"))
            clock.advance(1)
        assert len(memory) == 3
        assert Secret("t4") in memory
        assert Secret("t0") not in memory
        clock.advance(60)
        assert Secret("t4") not in memory


class TestWriteBack:
    async def test_an_entry_is_kept_until_it_lands_and_the_marker_beats_meanwhile(self) -> None:
        clock = FakeClock()
        store = FakeStore(clock)
        user = uuid.uuid4()
        store.put(link(user, 0, clock.now()))
        from tests.support.fakes import Marker, _sha

        store.markers[user] = Marker(_sha(Secret("refresh-0")), clock.monotonic())
        liveness = Liveness(store, 0.01)
        wb = WriteBack(store, liveness, NullObserver(), store_timeout=1.0, warn_after=0.0, clock=clock.now)
        store.faults.save_refreshed = 3
        wb.hold(user, Pending(store.rows[user], tokens(1, clock)))
        clock.advance(5)
        await asyncio.sleep(0.05)  # heartbeats ran with the new clock
        assert store.markers[user].heartbeat == clock.monotonic()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not len(wb):
                break
        assert store.rows[user].refresh_token.reveal() == "refresh-1"
        assert user not in store.markers
        await liveness.close()

    async def test_a_retry_task_is_dropped_once_its_entry_landed(self) -> None:
        """One task per user whose write-back failed; each is released once it landed (not kept for good)."""
        clock = FakeClock()
        store = FakeStore(clock)
        users = [uuid.uuid4() for _ in range(20)]
        for user in users:
            store.put(link(user, 0, clock.now()))
        liveness = Liveness(store, 0.01)
        wb = WriteBack(store, liveness, NullObserver(), store_timeout=1.0, warn_after=30.0, clock=clock.now)
        store.faults.save_refreshed = 2 * len(users)  # every entry fails at least once, then lands
        for user in users:
            wb.hold(user, Pending(store.rows[user], tokens(1, clock)))
        names = {f"write-back:{u}" for u in users}
        retries = [weakref.ref(t) for t in asyncio.all_tasks() if t.get_name() in names]
        assert len(retries) == len(users)
        for _ in range(300):
            await asyncio.sleep(0.01)
            if not len(wb):
                break
        assert {store.rows[u].refresh_token.reveal() for u in users} == {"refresh-1"}
        for _ in range(100):  # the tasks end right after their entry landed
            await asyncio.sleep(0.01)
            gc.collect()
            if all(r() is None for r in retries):
                break
        assert [r() for r in retries if r() is not None] == []
        await liveness.close()


class TestForcedRefresh:
    """An upstream refused the access token the broker served: refresh once, never hand that token out again."""

    async def test_a_rejected_token_is_refreshed_whatever_its_expiry(self) -> None:
        c = make_core(tokens(1, FakeClock()), expired=False)
        r = await c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256())
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REFRESHED, "access-1")

    async def test_a_stale_report_is_answered_with_the_current_token_without_the_idp(self) -> None:
        c = make_core(expired=False)
        r = await c.tokens.get_token(c.user, 5.0, Secret("some-older-token").sha256())
        assert (r.status, r.access_token.reveal()) == (TokenStatus.VALID, "access-0")
        assert c.idp.sent == []

    async def test_the_token_a_forced_refresh_produced_is_not_refreshed_again_within_the_interval(self) -> None:
        c = make_core(tokens(1, FakeClock()), tokens(2, FakeClock()), expired=False)
        await c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256())
        r = await c.tokens.get_token(c.user, 5.0, Secret("access-1").sha256())
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REAUTH_REQUIRED, "")
        c.clock.advance(SETTINGS.forced_interval + 1)
        r = await c.tokens.get_token(c.user, 5.0, Secret("access-1").sha256())
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REFRESHED, "access-2")

    async def test_a_failed_forced_refresh_never_answers_the_rejected_token(self) -> None:
        c = make_core(IdpUnavailable("down"), expired=False)
        r = await c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256())
        assert (r.status, r.access_token.reveal()) == (TokenStatus.IDP_UNAVAILABLE, "")

    async def test_no_refresh_token_or_no_idp_is_reauth_required(self) -> None:
        c = make_core(idp=NullIdentityProvider(), expired=False)
        r = await c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256())
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REAUTH_REQUIRED, "")

    async def test_concurrent_reports_share_one_refresh(self) -> None:
        c = make_core(tokens(1, FakeClock()), expired=False)
        answers = await asyncio.gather(
            *(c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256()) for _ in range(50))
        )
        assert {a.access_token.reveal() for a in answers} == {"access-1"}
        assert len(c.idp.sent) == 1


class TestAgainstTheRotatingIdp:
    """The domain against RotatingIdp, the IdP fake that tests/contract holds to oidc-provider."""

    async def test_each_refresh_sends_the_latest_token_once(self) -> None:
        c = make_core()
        idp = RotatingIdp(c.clock)
        grant = idp.login()
        c.store.put(Link(c.user, grant.access_token, grant.refresh_token, c.clock.now() - timedelta(seconds=1)))
        c.idp.script += [idp.refresh] * 3
        results = []
        for _ in range(3):
            results.append(await c.get())
            c.clock.advance(3601)  # the rotated access token expired
        assert [r.status for r in results] == [TokenStatus.REFRESHED] * 3
        assert len(set(c.idp.sent)) == 3  # a resend would have been refused, and revoked the grant
        assert c.idp.sent[0] == grant.refresh_token
        assert (await idp.refresh(Secret(c.row_refresh()))).refresh_token  # the stored token is the live one

    async def test_after_a_failed_forced_refresh_plain_calls_answer_no_token_until_a_refresh_succeeds(self) -> None:
        c = make_core(IdpUnavailable("down"), IdpUnavailable("still down"), tokens(1, FakeClock()), expired=False)
        r = await c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256())
        assert (r.status, r.access_token.reveal()) == (TokenStatus.IDP_UNAVAILABLE, "")
        assert c.store.rejected_access == {c.user: Secret("access-0").sha256()}
        r = await c.get()  # a plain call: no report, the stored token unexpired
        assert (r.status, r.access_token.reveal()) == (TokenStatus.IDP_UNAVAILABLE, "")
        r = await c.get()  # the IdP answers again
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REFRESHED, "access-1")
        assert (await c.get()).status is TokenStatus.VALID  # the new token is not the rejected one
        assert len(c.idp.sent) == 3

    async def test_a_new_login_ends_the_rejection(self) -> None:
        c = make_core(IdpUnavailable("down"), expired=False)
        await c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256())
        c.store.put(link(c.user, 7, c.clock.now() + timedelta(hours=1)))
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.VALID, "access-7")

    async def test_an_expired_rejected_token_is_handled_like_any_expired_token(self) -> None:
        c = make_core(IdpUnavailable("down"), expired=False)
        await c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256())
        c.store.put(replace(c.store.rows[c.user], refresh_token=Secret("")))
        assert (await c.get()).status is TokenStatus.REAUTH_REQUIRED  # not renewable, still unexpired
        c.clock.advance(2 * 3600)
        assert (await c.get()).status is TokenStatus.EXPIRED

    async def test_reports_at_once_store_the_rejection_once(self) -> None:
        c = make_core(tokens(1, FakeClock()), expired=False)
        await asyncio.gather(*(c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256()) for _ in range(50)))
        assert c.store.events.count("remember_rejected") == 1

    async def test_a_rejection_that_cannot_be_stored_still_answers_no_rejected_token(self) -> None:
        c = make_core(IdpUnavailable("down"), expired=False)
        c.store.faults.remember_rejected = 1
        r = await c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256())
        assert (r.status, r.access_token.reveal()) == (TokenStatus.IDP_UNAVAILABLE, "")

    async def test_a_stale_report_is_not_answered_with_a_current_token_that_was_rejected_too(self) -> None:
        c = make_core(IdpUnavailable("down"), IdpUnavailable("still down"), expired=False)
        await c.tokens.get_token(c.user, 5.0, Secret("access-0").sha256())
        r = await c.tokens.get_token(c.user, 5.0, Secret("an-older-token").sha256())
        assert (r.status, r.access_token.reveal()) == (TokenStatus.IDP_UNAVAILABLE, "")

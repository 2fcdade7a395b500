"""Leases on a real Redis: one holder at a time, extended and given back only by it, and
the batch forms (one round trip) keeping the same rules."""

from __future__ import annotations

import redis

from gathering_tasks.locks import Lease, acquire_all, holder, release_all
from tests.servers import free_port, wait_for


def test_a_lease_has_one_holder_who_alone_extends_and_gives_it_back(client: redis.Redis) -> None:
    # Given a lease taken by A
    a = Lease(client, "lease:one", 30, owner="host-a:1")
    b = Lease(client, "lease:one", 30, owner="host-b:2")
    assert a.acquire()

    # Then B cannot take it, nor extend it, and A can extend it
    assert not b.acquire()
    assert b.renew() == "lost"
    assert a.renew() == "held"
    assert holder(client.get("lease:one")) == "host-a:1"
    # and once A gives it back, B takes it
    a.release()
    assert client.get("lease:one") is None
    assert b.acquire()
    assert holder(client.get("lease:one")) == "host-b:2"


def test_a_lease_that_expired_and_was_taken_is_neither_extended_nor_released_by_its_old_holder(
    client: redis.Redis,
) -> None:
    # Given A's lease, expired (50 ms), then taken by B
    a = Lease(client, "lease:expiring", 0.05)
    b = Lease(client, "lease:expiring", 30)
    assert a.acquire()
    wait_for(lambda: client.exists("lease:expiring") == 0, 10, "the lease to expire")
    assert b.acquire()

    # When A tries to extend it, then to give it back
    renewed = a.renew()
    a.release()

    # Then it was lost to A, and B still holds it with B's TTL
    assert renewed == "lost"
    assert client.get("lease:expiring") == b.token
    assert client.pttl("lease:expiring") > 1000
    assert b.renew() == "held"


def test_leases_taken_and_given_back_in_one_round_trip_keep_to_one_holder(
    client: redis.Redis,
) -> None:
    # Given three leases of which another worker holds the second
    other = Lease(client, "lease:batch:2", 30)
    assert other.acquire()
    mine = [Lease(client, f"lease:batch:{i}", 30) for i in (1, 2, 3)]

    # When they are taken together
    taken = acquire_all(mine)

    # Then the free ones are mine, the held one is not
    assert taken == [True, False, True]
    assert [client.get(f"lease:batch:{i}") for i in (1, 2, 3)] == [
        mine[0].token,
        other.token,
        mine[2].token,
    ]
    # and giving them back together frees mine and leaves the other worker's alone
    release_all(mine)
    assert [client.exists(f"lease:batch:{i}") for i in (1, 2, 3)] == [0, 1, 0]
    assert other.renew() == "held"


def test_with_redis_unreachable_a_lease_is_not_taken_and_its_renewal_is_unknown(
    client: redis.Redis,
) -> None:
    # Given a lease held, and Redis then out of reach (a port nothing listens on)
    lease = Lease(client, "lease:down", 30)
    assert lease.acquire()
    gone = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    lease.client = gone
    fresh = [Lease(gone, f"lease:down:{i}", 30) for i in range(2)]

    # Then nothing raises: the renewal is unknown (it may still be ours), nothing is taken
    assert lease.renew() == "unknown"
    assert acquire_all(fresh) == [False, False]
    assert not Lease(gone, "lease:down:x", 30).acquire()
    release_all([lease])
    # and the lease is still in Redis, to expire with its TTL
    assert client.get("lease:down") == lease.token

"""Buckets: read items grouped so that every rank reads in every bucket and no rank holds more than the
bucket's bytes in flight (its reads, sends and receives)."""

from __future__ import annotations

from .data import Bucket, Fanout, ReadItem


def plan_buckets(items: list[ReadItem], fanouts: list[Fanout], world: int, bucket_bytes: int) -> list[Bucket]:
    """Round-robin over readers so every rank reads in every bucket, within per-rank byte bounds.

    A rank whose next item does not fit is done for this bucket (in-flight bytes only grow), so each
    bucket costs one pass over the ranks still reading plus its items.
    """
    # plan_reads makes each item's fanouts in item order: item i's are fanouts[first[i]:first[i + 1]].
    first = [0] * (len(items) + 1)
    for f in fanouts:
        first[f.item + 1] += 1
    for i in range(len(items)):
        first[i + 1] += first[i]
    need: list[tuple[tuple[int, int], ...]] = []  # (rank, bytes) an item puts in flight: its read, sends, receives
    for it in items:
        n = {it.reader: it.nbytes}
        for f in fanouts[first[it.index]:first[it.index + 1]]:
            n[f.src] = n.get(f.src, 0) + f.nbytes * len(f.dsts)
            for d in f.dsts:
                n[d] = n.get(d, 0) + f.nbytes
        need.append(tuple(n.items()))
    queues = [[] for _ in range(world)]
    for it in items:
        queues[it.reader].append(it.index)
    heads = [0] * world
    active = [r for r in range(world) if queues[r]]
    buckets = []
    while active:
        inflight = [0] * world
        chosen: list[int] = []
        open_ranks = list(active)
        while open_ranks:
            still_open = []
            for r in open_ranks:
                i = queues[r][heads[r]]
                fits = True
                if chosen:
                    for q, n in need[i]:
                        if inflight[q] + n > bucket_bytes:
                            fits = False
                            break
                if not fits:
                    continue
                for q, n in need[i]:
                    inflight[q] += n
                chosen.append(i)
                heads[r] += 1
                if heads[r] < len(queues[r]):
                    still_open.append(r)
            open_ranks = still_open
        active = [r for r in active if heads[r] < len(queues[r])]
        chosen.sort()
        buckets.append(Bucket(tuple(chosen), tuple(f for i in chosen for f in range(first[i], first[i + 1]))))
    return buckets

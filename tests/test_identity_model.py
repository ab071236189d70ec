"""Model test of copies (hypothesis): two or three copies of an image made at
random points of a random history (writes, checkpoints, backups, reopen,
resize, snapshot and revert, reset_tracking, a copy taken while a writer
holds the image), each asked with its own ids and the others'.

The rule checked after every step, for every copy and every id ever issued:
an id issued in the copy's own line of history (by it, or by the image it
was copied from before the copy) is answered, and covers every block that
differs from the content at the id's point; any other id is refused
(StaleChangeIdError).  Backups with any id either are refused, writing
nothing, or restore (with the chain that id ended) to the copy's content;
a chain mixing deltas of two copies restores to the last delta's content
or is refused.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import vdisk
from vdisk_testkit.machines import draw_write, resize_model, under_reported

BS = 4096


class Copy:
    def __init__(self, path, content: bytearray, lineage: set, snaps: dict):
        self.path = path
        self.content = content
        self.lineage = lineage          # ids this copy must answer
        self.snaps = snaps              # snapshot name -> content


class CopiesMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.copies: list[Copy] = []
        self.points: dict[str, bytes] = {}      # every id issued -> content at its point
        self.chains: dict[str, list[str]] = {}  # id -> delta files restoring to it
        self.deltas: list[tuple[str, str]] = []  # (delta path, its change id)
        self.n = 0

    def _name(self, what):
        self.n += 1
        return os.path.join(self.dir.name, f"{what}{self.n}")

    def _issued(self, c: Copy, cid: str, content: bytes):
        assert cid not in self.points or self.points[cid] == content, f"id {cid} issued twice"
        self.points[cid] = content
        c.lineage.add(cid)

    @initialize(blocks=st.integers(4, 24))
    def create(self, blocks):
        path = self._name("img") + ".vdk"
        vdisk.create(path, blocks * BS, block_size=BS).close()
        self.copies.append(Copy(path, bytearray(blocks * BS), set(), {}))

    copy_index = st.integers(0, 2)

    def _pick(self, i) -> Copy:
        return self.copies[i % len(self.copies)]

    @rule(i=copy_index, data=st.data())
    def write(self, i, data):
        c = self._pick(i)
        off, buf = draw_write(data, len(c.content), BS)
        with vdisk.open(c.path, "r+") as d:
            d.pwrite(buf, off)
        c.content[off:off + len(buf)] = buf

    @rule(i=copy_index)
    def checkpoint(self, i):
        c = self._pick(i)
        with vdisk.open(c.path, "r+") as d:
            self._issued(c, d.checkpoint(), bytes(c.content))

    @rule(i=copy_index, blocks=st.integers(2, 28))
    def resize(self, i, blocks):
        c = self._pick(i)
        new = blocks * BS - (BS // 2 if blocks % 3 == 0 else 0)
        with vdisk.open(c.path, "r+") as d:
            d.resize(new)
        resize_model(c.content, new)

    @rule(i=copy_index)
    def snapshot(self, i):
        c = self._pick(i)
        name = f"s{self.n}"
        self.n += 1
        with vdisk.open(c.path, "r+") as d:
            s = d.snapshot(name)
            self._issued(c, s.change_id, bytes(c.content))
        c.snaps[name] = bytes(c.content)

    @precondition(lambda self: any(c.snaps for c in self.copies))
    @rule(i=copy_index, data=st.data())
    def revert(self, i, data):
        c = self._pick(i)
        if not c.snaps:
            return
        name = data.draw(st.sampled_from(sorted(c.snaps)))
        with vdisk.open(c.path, "r+") as d:
            d.revert(name)
        c.content = bytearray(c.snaps[name])

    @rule(i=copy_index)
    def reset_tracking(self, i):
        c = self._pick(i)
        with vdisk.open(c.path, "r+") as d:
            d.reset_tracking()
        c.lineage = set()

    @precondition(lambda self: len(self.copies) < 3)
    @rule(i=copy_index, while_open=st.booleans())
    def copy(self, i, while_open):
        src = self._pick(i)
        path = self._name("copy") + ".vdk"
        if while_open:      # a copy of an image a writer holds: what a crash leaves
            with vdisk.open(src.path, "r+") as d:
                d.flush()
                shutil.copyfile(src.path, path)
        else:
            shutil.copyfile(src.path, path)
        self.copies.append(Copy(path, bytearray(src.content), set(src.lineage), dict(src.snaps)))

    @rule(i=copy_index, data=st.data(), restore=st.booleans())
    def backup(self, i, data, restore):
        c = self._pick(i)
        # in the order handed out: sorted, the random tokens would reorder them between runs
        since = data.draw(st.sampled_from(["*"] + list(self.points)))
        dest = self._name("delta") + ".h5"
        try:
            res = vdisk.backup(c.path, dest, since=since)
        except vdisk.StaleChangeIdError:
            assert since not in c.lineage, f"{c.path} refused its own id {since}"
            assert not os.path.exists(dest)
            return
        assert since == "*" or since in c.lineage, f"{c.path} answered {since}, not of its history"
        self._issued(c, res.change_id, bytes(c.content))
        self.deltas.append((dest, res.change_id))
        if since == "*":
            self.chains[res.change_id] = [dest]
        elif since in self.chains:
            self.chains[res.change_id] = self.chains[since] + [dest]
        chain = self.chains.get(res.change_id)
        if restore and chain:
            target = self._name("restored") + ".vdk"
            vdisk.restore(chain, target)
            with vdisk.open(target) as t:
                assert t.pread(t.size, 0) == bytes(c.content)
            os.unlink(target)

    @precondition(lambda self: len(self.deltas) >= 2)
    @rule(data=st.data())
    def mixed_restore(self, data):
        """A chain of one id followed by any delta: refused, or the delta's content."""
        ends = list(self.chains)
        if not ends:
            return
        base = data.draw(st.sampled_from(ends))
        delta, cid = data.draw(st.sampled_from(self.deltas))
        chain = self.chains[base] + [delta]
        target = self._name("mixed") + ".vdk"
        try:
            vdisk.restore(chain, target)
        except vdisk.BackupChainError:
            assert not os.path.exists(target)
            return
        with vdisk.open(target) as t:
            assert t.pread(t.size, 0) == self.points[cid], f"restore of {chain} is not {cid}'s content"
        os.unlink(target)

    @precondition(lambda self: self.copies)
    @invariant()
    def ids_answered_only_in_their_history(self):
        for c in self.copies:
            with vdisk.open(c.path) as d:
                now = bytes(c.content)
                assert d.pread(d.size, 0) == now
                for cid, then in self.points.items():
                    try:
                        _, missing = under_reported(d, cid, now, then, BS)
                    except vdisk.StaleChangeIdError:
                        assert cid not in c.lineage, f"{c.path} refused {cid} of its own history"
                        continue
                    assert cid in c.lineage, f"{c.path} answered {cid}, an id of a copy it diverged from"
                    assert not missing, f"{c.path}: under-report for {cid}: {sorted(missing)}"

    def teardown(self):
        for c in self.copies:
            res = vdisk.check(c.path)
            assert res.ok, (c.path, res)
        self.dir.cleanup()


TestCopies = CopiesMachine.TestCase
TestCopies.settings = settings(max_examples=int(os.environ.get("VDISK_MODEL_EXAMPLES", "40")),
                               stateful_step_count=30, deadline=None,
                               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

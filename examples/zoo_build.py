"""Build the whole real-model zoo and print its cards as a table.

    python examples/zoo_build.py            # everything (measured times in docs/zoo.md)
    python examples/zoo_build.py --fast     # the subset the tests and the README demo use

Models already in $WEIGHTOPS_ZOO with a matching key are skipped.
"""
import sys
import time

from weightops import zoo


def main(fast: bool) -> None:
    t0 = time.perf_counter()
    zoo.build(fast=fast)
    wall = time.perf_counter() - t0
    cards = {c["name"]: c for c in zoo.list_models()}
    names = zoo.FAST_NAMES if fast else zoo.NAMES
    print(f"\n{'model':30} {'kind':12} {'task':10} {'test':>6} {'shifted':>8} {'build s':>8}")
    for n in names:
        c = cards[n]
        task = c["task"]
        if task:
            test, shifted = c["scores"][task]["test"], c["scores"][task]["test_shifted"]
            print(f"{n:30} {c['kind']:12} {task:10} {test:6.3f} {shifted:8.3f} {c['build_seconds']:8.1f}")
        else:
            print(f"{n:30} {c['kind']:12} {'-':10} {'':>6} {'':>8} {c['build_seconds']:8.1f}")
    base = cards["base"]
    print("\npretrained baselines on the frozen body (base card) vs best full fine-tune:")
    for task, probes in base["probes"].items():
        fts = [c["scores"][task]["test"] for c in cards.values() if c["kind"] == "ft" and c["task"] == task
               and c["parent"] == "base"]
        untrained = base["scores"][task]["test"]
        print(f"  {task:10} untrained head {untrained:.3f}  probe(head on pooler) {probes['head_on_pooler']['test']:.3f}"
              f"  probe(mean-pool) {probes['meanpool']['test']:.3f}  fine-tunes {min(fts):.3f}..{max(fts):.3f}"
              f"   shifted: probes {probes['head_on_pooler']['test_shifted']:.3f}/{probes['meanpool']['test_shifted']:.3f}")
    total = sum(c["build_seconds"] for n, c in cards.items() if n in names)
    print(f"\nwall time of this run: {wall:.0f} s; sum of recorded build times: {total:.0f} s; zoo: {zoo.zoo_dir()}")


if __name__ == "__main__":
    main("--fast" in sys.argv[1:])

"""A quick smoke run of the benchmark, so it cannot silently rot. Timing targets live in the
benchmark's own table, not here: this checks that every measurement runs and what it shows works."""

import json
import pathlib
import subprocess
import sys
import unittest

BENCH = pathlib.Path(__file__).resolve().parent / "bench_gopdater.py"


class BenchmarkSmokeTest(unittest.TestCase):
    def test_quick_benchmark_runs_and_reports_every_measurement(self):
        """`bench_gopdater.py --quick --json` reports start-up, memory, latency, downtime, burst, wrk rates,
        fairness, every attack at once, a TLS handshake flood, a reconcile round, SIGTERM, and many projects (one push each, and a fleet push)."""
        # It takes a minute alone; beside CI's engine lanes on two cores, it took over four.
        proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"], capture_output=True, text=True,
                              timeout=480)
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        results = json.loads(proc.stdout)
        self.assertLessEqual({"startup", "latency", "downtime", "burst", "rejected", "fairness", "attacks",
                              "sigterm"}, set(results))
        self.assertTrue(results["latency"]["all_during_a_deployment"])
        self.assertEqual(results["latency"]["requests"], 200)
        self.assertFalse(results["downtime"]["gopdater"]["pull_inside_window"], "gopdater pulls before the stop")
        self.assertTrue(results["downtime"]["seed_order"]["pull_inside_window"], "the baseline pulls while down")
        self.assertEqual(results["burst"]["accepted"], 20)
        self.assertLessEqual(results["burst"]["deployments"], 2)
        for connection in ("keep_alive", "close", "tls"):
            for case in ("wrong_secret", "wrong_owner"):
                with self.subTest(case=case, connection=connection):
                    row = results["rejected"][f"{case}_{connection}"]
                    self.assertTrue(row["gopdater"]["all_403"] and row["bare"]["all_403"], row)
                    self.assertGreater(row["ratio"], 0)
        self.assertLessEqual(results["rejected"]["peak_threads"], results["rejected"]["thread_bound"])
        self.assertGreater(results["startup"]["port_open_ms"], 0)
        self.assertGreater(results["fairness"]["requests"], 0)
        self.assertEqual((results["attacks"]["valid_hook_status"], results["attacks"]["alive"]), (202, True))
        self.assertEqual(results["sigterm"]["exit_code"], 0)
        reconcile = results["reconcile"]
        self.assertEqual((reconcile["services"], reconcile["behind"], reconcile["queued_again"]), (20, 10, 0))
        flood = results["handshake_flood"]
        self.assertEqual((flood["connections"], flood["alive"]), (1000, True))
        self.assertGreater(flood["client_requests"], 0)
        for size in results["many_projects"]["sizes"]:
            with self.subTest(projects=size["projects"]):
                self.assertEqual((size["hook_status"], size["state"]), (202, "updated"))
        for row in results["many_projects"]["fleet"]:
            with self.subTest(fleet_parallel=row["parallel"]):
                self.assertEqual((row["hook_status"], row["updated"]), (202, row["projects"]))


if __name__ == "__main__":
    unittest.main()

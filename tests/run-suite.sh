#!/usr/bin/env bash
# The suite's runner (`make test`): pytest, plus a check that pytest really finished.
#
# A native crash inside a library (Ray ends the process from C++ on a failed internal check)
# kills pytest without its summary line: the run would just stop, exit 1, no word of why.
# conftest.py records each test as it starts; if pytest did not reach its end, this says
# which test was running and shows the fatal lines of the newest Ray session's logs.
set -u
python=${PYTHON:-python3}
progress=$(mktemp)
HYBRIDRAY_TEST_PROGRESS=$progress "$python" -m pytest "$@"
status=$?
if ! grep -q '^finished' "$progress"; then
  echo "tests/run-suite.sh: pytest died (exit $status) before finishing; the test running was: $(cat "$progress")" >&2
  session=$(ls -td /tmp/ray/session_2* 2>/dev/null | head -n 1)
  if [ -n "$session" ]; then
    echo "fatal lines in $session/logs:" >&2
    grep -h -E '^\[[^]]* C |Check failed|terminate called' "$session"/logs/*.log 2>/dev/null | tail -n 20 >&2
  fi
  [ "$status" -eq 0 ] && status=1
fi
rm -f "$progress"
exit "$status"

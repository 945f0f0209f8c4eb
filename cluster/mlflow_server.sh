#!/usr/bin/env bash
# An MLflow tracking server for a SLURM cluster, meant for the login node (or any host the
# compute nodes reach). Jobs log to it over HTTP (MLFLOW_TRACKING_URI=http://HOST:PORT), so
# concurrent trials never write one sqlite file over a network file system themselves: the
# server serialises their writes into its backend store, and artifacts are proxied to a
# directory on shared disk (--serve-artifacts), so jobs need no access to the artifact root.
#
#   cluster/mlflow_server.sh [options]            # foreground (use tmux/screen), or
#   cluster/mlflow_server.sh --detach [options]   # background; prints `export MLFLOW_TRACKING_URI=...`
#   cluster/mlflow_server.sh --stop [--root DIR]  # stop the detached server of DIR (by its pid file)
#
# Options (defaults in brackets):
#   --host ADDR        interface to bind [127.0.0.1]; on a cluster the login node's internal
#                      address, e.g. --host "$(hostname -i)" or 0.0.0.0 (then see --allowed-hosts)
#   --port N           [5000]; pick your own on a shared login node
#   --root DIR         shared-disk directory for the store, artifacts, log and pid file
#                      [$CTM_LAB_MLFLOW_ROOT or $HOME/ctm-lab-mlflow]
#   --backend URI      backend store [sqlite:///DIR/mlflow.db]; PostgreSQL for heavy use:
#                      postgresql://USER:PASS@DBHOST:5432/mlflow (needs psycopg2 in the venv)
#   --artifacts DIR    artifact root on shared disk [DIR/artifacts]
#   --workers N        server worker processes [2]
#   --allowed-hosts L  Host headers the server accepts [localhost, private IPs, this host's name]
#   --detach           run in the background (log DIR/server.log, pid DIR/server.pid) and wait
#                      until it answers /health
#   --stop             stop the server whose pid is in DIR/server.pid
set -euo pipefail

host=127.0.0.1
port=5000
root="${CTM_LAB_MLFLOW_ROOT:-$HOME/ctm-lab-mlflow}"
backend=""
artifacts=""
workers=2
allowed_hosts=""
detach=0
stop=0
wait_s=120
mlflow_bin="${MLFLOW_BIN:-mlflow}"
# The server's background job runner (GenAI evaluation jobs) is not needed for tracking and
# costs several processes and seconds of start-up; opt back in by exporting it as true.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

die() { echo "mlflow_server.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) host="${2:?--host needs a value}"; shift 2 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --root) root="${2:?--root needs a value}"; shift 2 ;;
    --backend) backend="${2:?--backend needs a value}"; shift 2 ;;
    --artifacts) artifacts="${2:?--artifacts needs a value}"; shift 2 ;;
    --workers) workers="${2:?--workers needs a value}"; shift 2 ;;
    --allowed-hosts) allowed_hosts="${2:?--allowed-hosts needs a value}"; shift 2 ;;
    --wait) wait_s="${2:?--wait needs a value}"; shift 2 ;;
    --detach) detach=1; shift ;;
    --stop) stop=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ "$port" =~ ^[0-9]+$ ]] && (( port > 0 && port < 65536 )) || die "--port must be 1..65535, got '$port'"
[[ "$workers" =~ ^[0-9]+$ ]] && (( workers >= 1 )) || die "--workers must be a positive integer, got '$workers'"
mkdir -p "$root"
root="$(cd "$root" && pwd)"
pid_file="$root/server.pid"
log_file="$root/server.log"

if (( stop )); then
  [[ -f "$pid_file" ]] || { echo "no pid file $pid_file: nothing to stop" >&2; exit 0; }
  pid="$(cat "$pid_file")"
  # Only a process that still runs `mlflow server` is ours to stop (pids get reused).
  if [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "mlflow.* server .*--backend-store-uri"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; }
    echo "stopped mlflow server $pid ($root)" >&2
  else
    echo "pid $pid in $pid_file is not this root's mlflow server: left alone" >&2
  fi
  rm -f "$pid_file"
  exit 0
fi

backend="${backend:-sqlite:///$root/mlflow.db}"
artifacts="${artifacts:-$root/artifacts}"
mkdir -p "$artifacts"
if [[ -z "$allowed_hosts" ]]; then
  # The defaults (localhost + private IPs) plus this host's names, so jobs may use either.
  allowed_hosts="localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*,172.*,$host,$host:*"
  for name in "$(hostname 2>/dev/null || true)" "$(hostname -f 2>/dev/null || true)"; do
    [[ -n "$name" ]] && allowed_hosts="$allowed_hosts,$name,$name:*"
  done
fi

cmd=("$mlflow_bin" server
     --host "$host" --port "$port"
     --backend-store-uri "$backend"
     --serve-artifacts --artifacts-destination "$artifacts"
     --workers "$workers"
     --allowed-hosts "$allowed_hosts")
url_host="$host"
[[ "$host" == "0.0.0.0" ]] && url_host="$(hostname -f 2>/dev/null || hostname)"
uri="http://$url_host:$port"

if (( ! detach )); then
  echo "MLflow at $uri  (store $backend, artifacts $artifacts)" >&2
  echo "jobs:  export MLFLOW_TRACKING_URI=$uri" >&2
  exec "${cmd[@]}"
fi

if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  die "a server for $root already runs (pid $(cat "$pid_file")); stop it with --stop --root $root"
fi
# setsid: own process group, so --stop ends the server and its workers together.
setsid "${cmd[@]}" >>"$log_file" 2>&1 < /dev/null &
echo $! > "$pid_file"
python_bin="${PYTHON:-python3}"
deadline=$(( $(date +%s) + wait_s ))
until "$python_bin" - "$host" "$port" <<'EOF' 2>/dev/null
import sys, urllib.request
host = "127.0.0.1" if sys.argv[1] == "0.0.0.0" else sys.argv[1]
with urllib.request.urlopen(f"http://{host}:{sys.argv[2]}/health", timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
do
  if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "mlflow server exited during start-up; tail of $log_file:" >&2; tail -n 30 "$log_file" >&2; rm -f "$pid_file"; exit 1
  fi
  if (( $(date +%s) > deadline )); then
    echo "mlflow server not answering after ${wait_s}s; tail of $log_file:" >&2; tail -n 30 "$log_file" >&2; exit 1
  fi
  sleep 0.5
done
echo "MLflow at $uri (pid $(cat "$pid_file"), store $backend, artifacts $artifacts, log $log_file)" >&2
echo "export MLFLOW_TRACKING_URI=$uri"

#!/usr/bin/env bash
# Local services of the pipeline, bound to 127.0.0.1, state under mlflow/ (git-ignored parts only):
#   mlflow   MLflow tracking server over mlflow/mlflow.db, artifacts in mlflow/artifacts
#   prefect  Prefect server (its database in mlflow/store/prefect) + a worker of the process pool
#            moe-lab-local, which runs the deployments of prefect.yaml from this folder
# Each runs in its own process group; pid and log in mlflow/store/<name>.{pid,log}.
# Locked down by default: everything on 127.0.0.1; Prefect's API answers cross-origin requests only
# from its own UI (PREFECT_SERVER_CORS_ALLOWED_ORIGINS) and requires its basic-auth string
# (PREFECT_SERVER_API_AUTH_STRING), a random credential made once in mlflow/store/prefect-api-auth
# (mode 600, git-ignored); clients and the worker get it as PREFECT_API_AUTH_STRING.
#
#   mlflow/services.sh up|down|status [mlflow|prefect]   (both when omitted; make services-up/-down)
#   mlflow/services.sh ui                                 MLflow UI in the foreground (make mlflow-ui)
#   eval "$(mlflow/services.sh env)"                      this shell talks to the local Prefect server
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/.venv/bin}
STORE=$ROOT/mlflow/store
MLFLOW_PORT=${MLFLOW_PORT:-5000}
PREFECT_PORT=${PREFECT_PORT:-4200}
POOL=${POOL:-moe-lab-local}
export PATH=$BIN:$PATH MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME=$STORE/prefect PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
AUTH_FILE=$STORE/prefect-api-auth
if [[ ! -s $AUTH_FILE ]]; then  # one random credential per checkout, readable by its owner only
  mkdir -p "$STORE"
  (umask 077; "${BIN}/python" -c 'import secrets; print("moe-lab:" + secrets.token_urlsafe(24))' >"$AUTH_FILE")
fi
export PREFECT_SERVER_API_AUTH_STRING=$(cat "$AUTH_FILE") PREFECT_API_AUTH_STRING=$(cat "$AUTH_FILE")
export PREFECT_SERVER_CORS_ALLOWED_ORIGINS=http://127.0.0.1:$PREFECT_PORT PREFECT_SERVER_API_HOST=127.0.0.1
MLFLOW_ARGS=(--backend-store-uri "sqlite:///$ROOT/mlflow/mlflow.db" --default-artifact-root "$ROOT/mlflow/artifacts"
             --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2)

running() { [[ -f $STORE/$1.pid ]] && kill -0 "$(cat "$STORE/$1.pid")" 2>/dev/null; }

start() {  # start NAME COMMAND...: in the background, in a new session (so `down` stops its children too)
  local name=$1; shift
  if running "$name"; then echo "$name: already running (pid $(cat "$STORE/$name.pid"))"; return; fi
  mkdir -p "$STORE"
  setsid "$@" >"$STORE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STORE/$name.pid"
  echo "$name: started (pid $!, log mlflow/store/$name.log)"
}

stop() {  # TERM the process group, KILL it after 20 s
  local name=$1 pid
  if ! running "$name"; then echo "$name: not running"; rm -f "$STORE/$name.pid"; return; fi
  pid=$(cat "$STORE/$name.pid")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$STORE/$name.pid"; echo "$name: stopped"
}

wait_healthy() {  # wait_healthy NAME URL
  for _ in $(seq 90); do curl -sf "$2" >/dev/null && { echo "$1: healthy at ${2%/*}"; return; }; sleep 1; done
  echo "$1: not healthy after 90 s; see mlflow/store/$1.log" >&2; tail -20 "$STORE/$1.log" >&2; exit 1
}

# The servers run no project code: under `make test`'s coverage hook (COVERAGE_PROCESS_*) they would
# only be traced, which roughly doubles the CPU time of Python code. The worker keeps it: its flow runs do.
mlflow_up() {
  start mlflow-server env -u COVERAGE_PROCESS_START -u COVERAGE_PROCESS_CONFIG "$BIN/mlflow" server "${MLFLOW_ARGS[@]}"
  wait_healthy mlflow-server "http://127.0.0.1:$MLFLOW_PORT/health"
}

prefect_up() {
  start prefect-server env -u COVERAGE_PROCESS_START -u COVERAGE_PROCESS_CONFIG "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  wait_healthy prefect-server "http://127.0.0.1:$PREFECT_PORT/api/health"
  "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 || "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
  # one flow run at a time: every deployment works in this one DVC workspace, which DVC locks anyway
  "$BIN/prefect" work-pool set-concurrency-limit "$POOL" 1 >/dev/null
  # flows log to the MLflow server when it is up, else straight into the sqlite store
  local uri=${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow/mlflow.db}
  curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && uri="http://127.0.0.1:$MLFLOW_PORT"
  MLFLOW_TRACKING_URI=$uri start prefect-worker "$BIN/prefect" worker start --pool "$POOL" --type process
  echo "prefect: UI http://127.0.0.1:$PREFECT_PORT; flows log to $uri; deploy with: make deploy"
}

what=${2:-all}
case ${1:-} in
  up)     [[ $what == prefect ]] || mlflow_up; [[ $what == mlflow ]] || prefect_up ;;
  down)   [[ $what == mlflow ]] || { stop prefect-worker; stop prefect-server; }  # workers before the server
          [[ $what == prefect ]] || stop mlflow-server ;;
  status) for n in mlflow-server prefect-server prefect-worker; do
            running "$n" && echo "$n: running (pid $(cat "$STORE/$n.pid"))" || echo "$n: stopped"; done ;;
  env)    printf 'export PREFECT_HOME=%q PREFECT_API_URL=%q PREFECT_API_AUTH_STRING=%q\n' \
            "$PREFECT_HOME" "$PREFECT_API_URL" "$PREFECT_API_AUTH_STRING" ;;
  ui)     if curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null; then
            echo "MLflow is already served at http://127.0.0.1:$MLFLOW_PORT"; exit 0; fi
          exec "$BIN/mlflow" ui "${MLFLOW_ARGS[@]}" ;;
  *)      sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; [[ ${1:-} == -h || ${1:-} == --help ]] || exit 2 ;;
esac

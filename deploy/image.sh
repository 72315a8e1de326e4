#!/usr/bin/env bash
# Container images of the service, built from the newest Bento (make build / make build-gpu first).
#
#   deploy/image.sh build cpu|gpu   image age-gender:cpu (bentofile.yaml) or age-gender:gpu (bentofile.gpu.yaml)
#   deploy/image.sh test  cpu|gpu   run the image, check /readyz, /predict, /model_info, /ui/, then remove it
#   deploy/image.sh prepare         only the Docker-less tooling and the local base image (no Bento needed)
#
# With a Docker engine (`docker info` answers): `bentoml containerize` and `docker run`. Without one (as on
# this project's development machines: Debian, apt and PyPI reachable, no container registry), these steps,
# each skipped when already done (1-3 need root when they have work to do):
# 1. podman, buildah, runc and debootstrap from Debian: buildah is the engine BentoML's `--backend buildah`
#    calls; podman holds the image store and runs the image for `test`.
# 2. /etc/containers/containers.conf (read by podman and buildah), written only if missing: runtime runc,
#    and open-files / process limits the sandbox can set (podman's defaults fail there with "setrlimit:
#    Operation not permitted", and crun does not support its hybrid cgroups).
# 3. The Dockerfile's base image (python:3.11-slim), made locally when podman does not hold it, since no
#    registry is reachable: a debootstrap of Debian bookworm (its Python is 3.11, as the project's) with
#    python3, pip, venv and CA certificates, imported under the base image's name so that buildah uses it
#    without asking a registry. Before the import: EXTERNALLY-MANAGED is removed (the generated Dockerfile
#    pip-installs uv into the system Python), `python` points to python3 (as in the official image), and the
#    host's apt sources and extra CA certificates are copied in, so that apt and downloads inside the build
#    reach the host's package sources and trust what the host trusts.
# 4. `bentoml containerize --backend buildah --opt network=host`: the build's RUN steps use the host's
#    network (no CNI bridge on these machines), hence its package sources. Then dangling images are pruned
#    (disk).
# `test` runs the image with podman on the host network and passes the service its own --port, for the
# same reason.
#
# Environment: BENTOML_HOME (default ~/bentoml), ENGINE=docker|podman (default: docker if it answers),
# PORT (test; default 3000, or a free port if 3000 is taken), READY_TIMEOUT (test; default 120 s),
# RUN_ARGS (test; extra `run` flags, e.g. "--gpus all" with Docker), PHOTO (test; a one-face photo instead of
# the astronaut JPEG from devtools.photos), PRUNE=0 (build; keep dangling images),
# LAYERS=1 (build, buildah; keep layer cache for faster rebuilds, at the cost of disk).
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
BENTOML=$VENV/bin/bentoml
export BENTOML_DO_NOT_TRACK=True
CONTAINERS_CONF=/etc/containers/containers.conf
STEP=""

log() { printf '[image.sh] %s\n' "$*"; }
die() {
	printf '[image.sh] ERROR: %s\n' "$*" >&2
	exit 1
}
on_err() {
	local rc=$?
	if [ -n "$STEP" ]; then
		printf '[image.sh] ERROR: step "%s" failed (exit %s)\n' "$STEP" "$rc" >&2
	else
		printf '[image.sh] ERROR: "%s" failed (exit %s)\n' "$BASH_COMMAND" "$rc" >&2
	fi
	exit "$rc"
}
trap on_err ERR

# step NAME CMD...: run CMD, print how long it took
step() {
	local name=$1 t0=$EPOCHREALTIME
	shift
	STEP=$name
	log "-> $name"
	"$@"
	STEP=""
	log "   $name: $(elapsed "$t0") s"
}
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

usage() { die "usage: deploy/image.sh build|test cpu|gpu  (or: deploy/image.sh prepare)"; }

flavour() {
	case "${1:-}" in
	cpu) BENTO_NAME=age_gender_service IMAGE=age-gender:cpu BENTOFILE=bentofile.yaml MAKE_BUILD="make build" ;;
	gpu) BENTO_NAME=age_gender_service_gpu IMAGE=age-gender:gpu BENTOFILE=bentofile.gpu.yaml MAKE_BUILD="make build-gpu" ;;
	*) usage ;;
	esac
}

engine() {
	if [ -n "${ENGINE:-}" ]; then
		case "$ENGINE" in docker | podman) ;; *) die "ENGINE must be docker or podman, not '$ENGINE'" ;; esac
		[ "$ENGINE" = podman ] || docker info >/dev/null 2>&1 || die "ENGINE=docker, but the Docker engine does not answer (docker info)"
	elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
		ENGINE=docker
	else
		ENGINE=podman
	fi
	log "engine: $ENGINE"
}

# ---------------------------------------------------------------- Docker-less route: tools, config, base image
is_root() { [ "$(id -u)" = 0 ]; }

ensure_tools() {
	local missing=()
	for cmd in podman buildah runc debootstrap; do command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd"); done
	[ ${#missing[@]} = 0 ] && return 0
	is_root || die "no Docker engine, and ${missing[*]} missing: install podman buildah runc debootstrap (as root: apt-get install podman buildah runc debootstrap uidmap fuse-overlayfs containernetworking-plugins conmon)"
	command -v apt-get >/dev/null 2>&1 || die "no Docker engine, ${missing[*]} missing, and no apt-get to install them"
	log "installing podman, buildah, runc, debootstrap from Debian (missing: ${missing[*]})"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman buildah runc debootstrap \
		uidmap fuse-overlayfs containernetworking-plugins conmon >/dev/null
}

# The sandbox cannot raise RLIMIT_NOFILE/NPROC to podman's defaults, and crun fails on hybrid cgroups: runc works.
ensure_containers_conf() {
	if [ -f "$CONTAINERS_CONF" ]; then
		grep -q '^[[:space:]]*runtime[[:space:]]*=[[:space:]]*"runc"' "$CONTAINERS_CONF" &&
			grep -q '^[[:space:]]*default_ulimits' "$CONTAINERS_CONF" ||
			log "NOTE: $CONTAINERS_CONF exists without runtime = \"runc\" / default_ulimits: left as it is"
		return 0
	fi
	is_root || die "$CONTAINERS_CONF missing and not root: create it with default_ulimits and runtime = \"runc\" (see deploy/image.sh)"
	local nofile
	nofile=$(ulimit -Hn)
	if [ "$nofile" = unlimited ] || [ "$nofile" -gt 20000 ]; then nofile=20000; fi
	mkdir -p "$(dirname "$CONTAINERS_CONF")"
	cat >"$CONTAINERS_CONF" <<EOF
# written by age-gender deploy/image.sh: this sandbox cannot raise the open-files / process limits to podman's
# defaults (setrlimit: Operation not permitted), and crun does not support its hybrid cgroups; runc works.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF
	log "wrote $CONTAINERS_CONF (nofile=$nofile, nproc=32768, runtime runc)"
}

# the Debian mirror the host uses (deb822 sources first, then the one-line format)
host_mirror() {
	local m=""
	[ -f /etc/apt/sources.list.d/debian.sources ] &&
		m=$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
	[ -z "$m" ] && [ -f /etc/apt/sources.list ] &&
		m=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list)
	echo "${m:-http://deb.debian.org/debian}"
}

# BASE: the FROM image, fully qualified. Made locally (Debian's own Python, same version) only if podman lacks it.
ensure_base_image() {
	local base=$1 suite rootfs mirror
	if podman image exists "$base"; then
		log "base image $base: present"
		return 0
	fi
	case "$base" in
	docker.io/library/python:3.11-slim | docker.io/library/python:3.11-slim-bookworm) suite=bookworm ;;
	*) die "base image $base is not in podman's store, no registry is reachable, and only python:3.11-slim can be made locally (debootstrap)" ;;
	esac
	is_root || die "making base image $base with debootstrap needs root"
	mirror=$(host_mirror)
	rootfs=$(mktemp -d /var/tmp/age-gender-rootfs.XXXXXX)
	ROOTFS_TMP=$rootfs
	log "making $base: debootstrap $suite from $mirror into $rootfs"
	debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
		"$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || die "debootstrap failed: see $rootfs.log"
	# the generated Dockerfile pip-installs uv into the system Python; the official image has `python`
	rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
	ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
	# apt and downloads inside the build use the host's package sources and trust what the host trusts
	if [ -f /etc/apt/sources.list.d/debian.sources ]; then
		cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
		rm -f "$rootfs/etc/apt/sources.list"
	fi
	if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
		cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
	fi
	chroot "$rootfs" /usr/sbin/update-ca-certificates >/dev/null 2>&1
	rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
	tar -C "$rootfs" -c . | podman import --quiet \
		--change 'ENV LANG=C.UTF-8' \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
		--change 'LABEL age-gender.base="debootstrap bookworm, made by deploy/image.sh"' \
		--change 'CMD ["python3"]' - "$base" >/dev/null
	rm -rf "$rootfs" "$rootfs.log"
	ROOTFS_TMP=""
}
ROOTFS_TMP=""
cleanup_rootfs() { if [ -n "$ROOTFS_TMP" ]; then rm -rf "$ROOTFS_TMP"; fi; }

# image name as podman stores it: python:3.11-slim -> docker.io/library/python:3.11-slim
qualify() {
	local name=$1 first=${1%%/*}
	if [[ "$name" != */* ]]; then
		name=docker.io/library/$name
	elif [[ "$first" != *.* && "$first" != *:* && "$first" != localhost ]]; then
		name=docker.io/$name
	fi
	[[ "${name##*/}" == *:* || "$name" == *@* ]] || name=$name:latest
	echo "$name"
}

# ---------------------------------------------------------------- the Bento
newest_bento() {
	[ -x "$BENTOML" ] || die "no $BENTOML: run make setup first"
	local out
	out=$(cd "$ROOT" && "$VENV/bin/python" - "$BENTO_NAME" 2>/dev/null <<'EOF'
import sys

import bentoml

try:
    bento = bentoml.bentos.get(f"{sys.argv[1]}:latest")
except bentoml.exceptions.NotFound:
    sys.exit(0)
print(bento.tag, bento.path_of("env/docker/Dockerfile"))
EOF
	) || die "could not read the Bento store (BENTOML_HOME=${BENTOML_HOME:-~/bentoml})"
	[ -n "$out" ] || die "no Bento named $BENTO_NAME in ${BENTOML_HOME:-~/bentoml}: run '$MAKE_BUILD' ($BENTOFILE) first"
	read -r BENTO_TAG DOCKERFILE <<<"$out"
	[ -f "$DOCKERFILE" ] || die "Bento $BENTO_TAG has no $DOCKERFILE"
	log "bento: $BENTO_TAG"
}

# base images of the Dockerfile: FROM lines, minus references to earlier stages
dockerfile_bases() {
	awk 'toupper($1) == "FROM" {
		img = ""
		for (i = 2; i <= NF; i++) if ($i !~ /^--/) { img = $i; break }
		if (toupper($(NF - 1)) == "AS") stage[$NF] = 1
		if (img != "" && !(img in stage) && !(img in seen)) { seen[img] = 1; print img }
	}' "$1"
}

image_size() {
	local bytes
	bytes=$($ENGINE image inspect --format '{{.Size}}' "$IMAGE")
	echo "$(numfmt --to=si --suffix=B "$bytes") ($bytes bytes)"
}

prune_dangling() { log "pruned $(podman image prune -f | grep -c . || true) dangling image(s)"; }

storage_report() {
	if [ "$ENGINE" = podman ]; then
		log "container storage: $(du -sh /var/lib/containers/storage 2>/dev/null | cut -f1); disk free: $(df -h --output=avail /var/lib/containers | tail -1 | tr -d ' ')"
	fi
}

# ---------------------------------------------------------------- commands
cmd_prepare() {
	engine
	[ "$ENGINE" = docker ] && {
		log "Docker answers: nothing to prepare"
		return 0
	}
	step "tools (podman, buildah, runc, debootstrap)" ensure_tools
	step "containers.conf" ensure_containers_conf
	step "base image" ensure_base_image "$(qualify "${BASE_IMAGE:-python:3.11-slim}")"
}

cmd_build() {
	local t0=$EPOCHREALTIME base
	flavour "$1"
	engine
	step "newest Bento $BENTO_NAME" newest_bento
	if [ "$ENGINE" = docker ]; then
		step "containerize $BENTO_TAG -> $IMAGE (docker)" "$BENTOML" containerize -t "$IMAGE" "$BENTO_TAG"
	else
		step "tools (podman, buildah, runc, debootstrap)" ensure_tools
		step "containers.conf" ensure_containers_conf
		local bases
		mapfile -t bases < <(dockerfile_bases "$DOCKERFILE")
		[ ${#bases[@]} -gt 0 ] || die "no FROM line in $DOCKERFILE"
		for base in "${bases[@]}"; do
			step "base image $base" ensure_base_image "$(qualify "$base")"
		done
		local opts=(--opt network=host)
		[ "${LAYERS:-0}" = 1 ] && opts+=(--opt layers)
		step "containerize $BENTO_TAG -> $IMAGE (buildah)" \
			"$BENTOML" containerize --backend buildah "${opts[@]}" -t "$IMAGE" "$BENTO_TAG"
		[ "${PRUNE:-1}" = 1 ] && step "prune dangling images" prune_dangling
		step "disk use" storage_report
	fi
	$ENGINE images "$IMAGE"
	log "built $IMAGE from $BENTO_TAG: $(image_size); total $(elapsed "$t0") s"
}

CONTAINER=""
cleanup_container() {
	if [ -n "$CONTAINER" ]; then
		$ENGINE rm -f "$CONTAINER" >/dev/null 2>&1 || true
		log "removed container $CONTAINER"
	fi
}

start_container() { "${run[@]}" >/dev/null; }
port_busy() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# sum of the RSS of the container's processes (host view; shared pages are counted once per process)
container_rss() {
	local pid
	pid=$($ENGINE inspect --format '{{.State.Pid}}' "$CONTAINER" 2>/dev/null) || return 0
	ps -e -o pid=,ppid=,rss= | awk -v root="$pid" '
		{ parent[$1] = $2; rss[$1] = $3 }
		END {
			for (p in rss) { q = p; while (q != "" && q != 0 && q != root) q = parent[q]; if (q == root) sum += rss[p] }
			printf "%.2f GB", sum / 1048576
		}'
}

fail_logs() {
	$ENGINE logs --tail 40 "$CONTAINER" 2>&1 | sed 's/^/    | /' >&2 || true
	die "$*"
}

wait_ready() {
	local deadline=$((SECONDS + ${READY_TIMEOUT:-120}))
	until curl -fsS -o /dev/null "http://127.0.0.1:$PORT/readyz" 2>/dev/null; do
		[ "$($ENGINE inspect --format '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" = true ] ||
			fail_logs "container $CONTAINER exited before it was ready (logs above)"
		[ $SECONDS -lt "$deadline" ] || fail_logs "not ready after ${READY_TIMEOUT:-120} s on port $PORT (logs above)"
		sleep 1
	done
}

check_predict() {
	local code faces
	code=$(curl -sS -o "$WORK/predict.json" -w '%{http_code}' -F "image=@$WORK/astronaut.jpg;type=$(file -b --mime-type "$WORK/astronaut.jpg")" \
		"http://127.0.0.1:$PORT/predict")
	[ "$code" = 200 ] || fail_logs "POST /predict: HTTP $code: $(head -c 300 "$WORK/predict.json")"
	faces=$(jq '.faces | length' "$WORK/predict.json")
	[ "$faces" = 1 ] || fail_logs "POST /predict: expected 1 face in the astronaut photo, got $faces: $(head -c 300 "$WORK/predict.json")"
	log "   /predict: HTTP 200, $(jq -c '.faces[0] | {age, gender, gender_probability}' "$WORK/predict.json")"
}

check_model_info() {
	local code method=GET
	code=$(curl -sS -o "$WORK/info.json" -w '%{http_code}' "http://127.0.0.1:$PORT/model_info")
	if [ "$code" = 405 ]; then # a plain @bentoml.api is POST-only
		method=POST
		code=$(curl -sS -o "$WORK/info.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' -d '{}' \
			"http://127.0.0.1:$PORT/model_info")
	fi
	[ "$code" = 200 ] && jq -e . "$WORK/info.json" >/dev/null 2>&1 ||
		fail_logs "/model_info: HTTP $code: $(head -c 300 "$WORK/info.json")"
	log "   $method /model_info: HTTP 200, $(jq -c . "$WORK/info.json" | head -c 400)"
}

check_ui() {
	local out code type
	out=$(curl -sS -o "$WORK/ui.html" -w '%{http_code} %{content_type}' "http://127.0.0.1:$PORT/ui/")
	read -r code type <<<"$out"
	[ "$code" = 200 ] && [[ "$type" == text/html* ]] || fail_logs "GET /ui/: HTTP $code, $type"
	log "   /ui/: HTTP 200, $type, $(wc -c <"$WORK/ui.html") bytes"
}

cmd_test() {
	local t0=$EPOCHREALTIME run
	flavour "$1"
	engine
	[ "$ENGINE" = podman ] && ensure_tools && ensure_containers_conf
	$ENGINE image inspect "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE: run deploy/image.sh build $1 first"
	[ -x "$VENV/bin/python" ] || die "no $VENV: run make setup first (it makes the test photo)"
	command -v jq >/dev/null || die "jq is needed to read the answers"
	WORK=$(mktemp -d)
	CONTAINER=age-gender-test-$1-$$
	trap 'cleanup_container; rm -rf "$WORK"' EXIT

	if [ -n "${PHOTO:-}" ]; then
		cp "$PHOTO" "$WORK/astronaut.jpg" || die "cannot read PHOTO=$PHOTO"
	else
		(cd "$ROOT" && "$VENV/bin/python" -c \
			"import sys; from devtools.photos import astronaut; astronaut().save(sys.argv[1])" "$WORK/astronaut.jpg") ||
			die "could not make the astronaut photo (devtools.photos)"
	fi
	if [ -z "${PORT:-}" ]; then
		PORT=3000
		if port_busy $PORT; then
			PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
			log "port 3000 is taken: using $PORT"
		fi
	elif port_busy "$PORT"; then
		die "port $PORT is taken"
	fi

	# podman here: host network (no CNI bridge in the sandbox), the service's own --port; Docker: a mapped port
	read -ra extra <<<"${RUN_ARGS:-}"
	if [ "$ENGINE" = podman ]; then
		run=(podman run -d --name "$CONTAINER" --network host "${extra[@]}" "$IMAGE" --port "$PORT")
	else
		run=(docker run -d --name "$CONTAINER" -p "127.0.0.1:$PORT:3000" "${extra[@]}" "$IMAGE")
	fi
	step "start $IMAGE" start_container
	step "ready (/readyz, up to ${READY_TIMEOUT:-120} s)" wait_ready
	step "POST /predict (astronaut, 1 face)" check_predict
	step "/model_info" check_model_info
	step "GET /ui/" check_ui
	log "memory (RSS of the container's processes): $(container_rss)"
	log "image $IMAGE: $(image_size)"
	log "OK: $IMAGE passed in $(elapsed "$t0") s"
}

trap cleanup_rootfs EXIT
case "${1:-}" in
build) cmd_build "${2:-}" ;;
test) cmd_test "${2:-}" ;;
prepare) cmd_prepare ;;
*) usage ;;
esac

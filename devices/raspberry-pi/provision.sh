#!/usr/bin/env bash
# provision.sh: turn a fresh Raspberry Pi OS (64-bit) board into an edgemole edge client service.
#
# Run as root on the board. Safe to run again: every step checks what is already there, so the same
# command also updates an installed board (new edgemole version, new unit file). See --help and README.md.
set -euo pipefail
umask 022

readonly PROG="${0##*/}"
SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly UNIT_SRC="${SCRIPT_DIR}/edgemole-client@.service"
readonly ENV_EXAMPLE="${SCRIPT_DIR}/client.env.example"

readonly SERVICE_USER="edgemole"
readonly STATE_DIR="/var/lib/edgemole"
readonly VENV="/opt/edgemole"
readonly CONF_DIR="/etc/edgemole"
readonly UNIT_DIR="/etc/systemd/system"
readonly PYTHON="${EDGEMOLE_PYTHON:-/usr/bin/python3}"

DRY_RUN=0
START=1
BROKER=""
FLEET=""
THREADS=""
DATA_FILE=""
TEST_DATA_FILE=""
TORCH_INDEX="https://download.pytorch.org/whl/cpu"
FIND_LINKS=""
CLIENT_ID=""
SOURCE=""
CREDENTIALS=""

usage() {
    cat <<EOF
Usage: ${PROG} [OPTIONS] CLIENT_ID [SOURCE]

Set up this board (Raspberry Pi OS 64-bit, run as root) as the edgemole edge client CLIENT_ID:
  1. create the system user '${SERVICE_USER}' and its state directory ${STATE_DIR}
  2. install python3-venv (apt) if missing and create a virtual environment in ${VENV}
  3. install edgemole from SOURCE into it, with the CPU build of torch
  4. install the systemd unit edgemole-client@.service into ${UNIT_DIR}
  5. write ${CONF_DIR}/CLIENT_ID.env from client.env.example if it does not exist yet, and install the
     device's broker credentials (--credentials) into ${CONF_DIR}/CLIENT_ID/
  6. enable edgemole-client@CLIENT_ID and (re)start it when its data file is in place

Arguments:
  CLIENT_ID            id of this device in the fleet (1-64 of letters, digits, '_', '.', '-'); it is also
                       the systemd instance name
  SOURCE               what to pip-install: a path to an edgemole checkout or wheel, or a pip requirement
                       (e.g. 'edgemole==0.1.0'). Default: the checkout this script is part of.

Options (the ones marked * only apply when the env file is created; edit it afterwards otherwise):
  --credentials DIR    this device's folder of 'edgemole broker init' (DIR/devices/CLIENT_ID: ca.crt, client.crt,
                       client.key, password, client.env): installed into ${CONF_DIR}/CLIENT_ID/; * the env file
                       takes the broker URL and EDGEMOLE_MQTT_* settings from its client.env
  --broker URL         * MQTT broker, e.g. mqtts://aggregator.local:8883 (default with --credentials: its URL)
  --fleet NAME         * fleet name (must match the aggregator's --fleet)
  --threads N          * torch threads for this client (default 4)
  --data FILE          copy FILE (.csv, .jsonl or .json) to ${STATE_DIR}/CLIENT_ID/train.<ext>
  --test-data FILE     copy FILE to ${STATE_DIR}/CLIENT_ID/test.<ext>; * the env file passes it as --test-data
  --torch-index URL    extra pip index holding the CPU torch wheels (default ${TORCH_INDEX});
                       '' to use the default index only
  --find-links DIR     also look for wheels in DIR (pre-built wheels for an offline or slow board)
  --no-start           install and enable the unit but do not (re)start it
  --dry-run            print the commands that would change the system instead of running them
  -h, --help           show this help

Example:
  sudo ${PROG} --credentials ./pi-01 --data ./pi-01.jsonl pi-01 ~/edgemole
EOF
}

die() {
    printf '%s: error: %s\n' "${PROG}" "$*" >&2
    exit 1
}

note() {
    printf '==> %s\n' "$*"
}

warn() {
    printf '%s: warning: %s\n' "${PROG}" "$*" >&2
}

# Run a command that changes the system, or only show it with --dry-run.
run() {
    if ((DRY_RUN)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# write_file PATH MODE OWNER GROUP: write stdin to PATH atomically with the given mode and owner.
write_file() {
    local path="$1" mode="$2" owner="$3" group="$4" content tmp
    content="$(cat)"
    if ((DRY_RUN)); then
        printf '+ write %q (mode %s, %s:%s):\n' "${path}" "${mode}" "${owner}" "${group}"
        printf '%s\n' "${content}" | sed 's/^/|   /'
        return
    fi
    tmp="$(mktemp "${path}.XXXXXX")"
    printf '%s\n' "${content}" >"${tmp}"
    chown "${owner}:${group}" "${tmp}"
    chmod "${mode}" "${tmp}"
    mv -f -- "${tmp}" "${path}"
}

# need_value OPTION ARGS...: the value that follows OPTION, or die.
need_value() {
    [[ $# -ge 2 ]] || die "option $1 needs a value (see --help)"
    printf '%s' "$2"
}

# env_value FILE VAR: the last value of VAR in a systemd environment file, quotes removed.
env_value() {
    local value
    value="$(sed -n "s/^[[:space:]]*$2=//p" "$1" | tail -n 1)"
    value="${value%\"}"
    value="${value#\"}"
    printf '%s' "${value}"
}

data_ext() {
    local ext="${1##*.}"
    ext="${ext,,}"
    case "${ext}" in
        csv | jsonl | json) printf '%s' "${ext}" ;;
        *) die "data file '$1' must end in .csv, .jsonl or .json" ;;
    esac
}

parse_args() {
    local positional=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -h | --help)
                usage
                exit 0
                ;;
            --dry-run) DRY_RUN=1 ;;
            --no-start) START=0 ;;
            --broker) BROKER="$(need_value "$@")"; shift ;;
            --credentials) CREDENTIALS="$(need_value "$@")"; shift ;;
            --fleet) FLEET="$(need_value "$@")"; shift ;;
            --threads) THREADS="$(need_value "$@")"; shift ;;
            --data) DATA_FILE="$(need_value "$@")"; shift ;;
            --test-data) TEST_DATA_FILE="$(need_value "$@")"; shift ;;
            --torch-index) TORCH_INDEX="$(need_value "$@")"; shift ;;
            --find-links) FIND_LINKS="$(need_value "$@")"; shift ;;
            --broker=* | --credentials=* | --fleet=* | --threads=* | --data=* | --test-data=* | --torch-index=* | --find-links=*)
                parse_args_value "${1%%=*}" "${1#*=}"
                ;;
            --)
                shift
                positional+=("$@")
                break
                ;;
            -*) die "unknown option '$1' (see --help)" ;;
            *) positional+=("$1") ;;
        esac
        shift
    done
    [[ ${#positional[@]} -ge 1 ]] || { usage >&2; exit 2; }
    [[ ${#positional[@]} -le 2 ]] || die "too many arguments: ${positional[*]} (see --help)"
    CLIENT_ID="${positional[0]}"
    SOURCE="${positional[1]:-}"
}

parse_args_value() {
    case "$1" in
        --broker) BROKER="$2" ;;
        --credentials) CREDENTIALS="$2" ;;
        --fleet) FLEET="$2" ;;
        --threads) THREADS="$2" ;;
        --data) DATA_FILE="$2" ;;
        --test-data) TEST_DATA_FILE="$2" ;;
        --torch-index) TORCH_INDEX="$2" ;;
        --find-links) FIND_LINKS="$2" ;;
        *) die "internal error: no value option $1" ;;
    esac
}

check_args() {
    local name_re='^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'
    [[ "${CLIENT_ID}" =~ ${name_re} ]] ||
        die "invalid client id '${CLIENT_ID}': use 1-64 of letters, digits, '_', '.', '-' (starting with a letter or digit)"
    if [[ -n "${FLEET}" && ! "${FLEET}" =~ ${name_re} ]]; then
        die "invalid fleet name '${FLEET}'"
    fi
    if [[ -n "${THREADS}" && ! "${THREADS}" =~ ^[1-9][0-9]*$ ]]; then
        die "--threads needs a positive integer, not '${THREADS}'"
    fi
    if [[ -n "${BROKER}" && "${BROKER}" =~ [[:space:]] ]]; then
        die "--broker must not contain spaces"
    fi
    local f
    for f in "${DATA_FILE}" "${TEST_DATA_FILE}"; do
        if [[ -z "${f}" ]]; then
            continue
        fi
        [[ -f "${f}" && -r "${f}" ]] || die "data file '${f}' does not exist or is not readable"
        data_ext "${f}" >/dev/null
    done
    if [[ -n "${CREDENTIALS}" ]]; then
        local cf
        for cf in ca.crt client.crt client.key password client.env; do
            [[ -r "${CREDENTIALS}/${cf}" ]] || die "--credentials: ${CREDENTIALS}/${cf} is missing (use DIR/devices/${CLIENT_ID} of 'edgemole broker init')"
        done
        grep -q "CERT_FILE=.*/${CLIENT_ID}/client.crt" "${CREDENTIALS}/client.env" ||
            warn "${CREDENTIALS}/client.env does not look like the credentials of ${CLIENT_ID}"
    fi
    if [[ -n "${FIND_LINKS}" && ! -d "${FIND_LINKS}" ]]; then
        die "--find-links: '${FIND_LINKS}' is not a directory"
    fi
    [[ -f "${UNIT_SRC}" ]] || die "unit file ${UNIT_SRC} is missing (run this script from an edgemole checkout)"
    [[ -f "${ENV_EXAMPLE}" ]] || die "${ENV_EXAMPLE} is missing (run this script from an edgemole checkout)"

    if [[ -z "${SOURCE}" ]]; then
        local checkout
        checkout="$(cd -- "${SCRIPT_DIR}/../.." && pwd)"
        grep -qs '^name = "edgemole"' "${checkout}/pyproject.toml" ||
            die "no SOURCE given and ${checkout} is not an edgemole checkout (see --help)"
        SOURCE="${checkout}"
    elif [[ -e "${SOURCE}" ]]; then
        SOURCE="$(realpath -- "${SOURCE}")"
        if [[ -d "${SOURCE}" && ! -f "${SOURCE}/pyproject.toml" ]]; then
            die "'${SOURCE}' has no pyproject.toml: not an edgemole checkout"
        fi
    elif [[ "${SOURCE}" == */* || "${SOURCE}" == *.whl ]]; then
        die "'${SOURCE}' does not exist"
    fi
}

check_system() {
    if ((!DRY_RUN)); then
        [[ ${EUID} -eq 0 ]] || die "run as root (sudo ${PROG} ...), or try --dry-run"
        [[ -d /run/systemd/system ]] || die "systemd is not running on this machine"
    fi
    command -v dpkg >/dev/null || die "this script expects a Debian-based system (Raspberry Pi OS)"
    local arch
    arch="$(dpkg --print-architecture)"
    case "${arch}" in
        arm64) ;;
        amd64) note "architecture amd64: not a Raspberry Pi, but the client runs here too" ;;
        *)
            # A 32-bit userland (armhf) can run on a 64-bit kernel, so uname -m is not enough.
            local msg="userland architecture '${arch}': torch needs a 64-bit OS (Raspberry Pi OS 64-bit, arm64)"
            if ((DRY_RUN)); then warn "${msg}"; else die "${msg}"; fi
            ;;
    esac
    if [[ -x "${PYTHON}" ]]; then
        local version
        version="$("${PYTHON}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        "${PYTHON}" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            die "edgemole needs Python >= 3.11; ${PYTHON} is ${version}"
    elif ((!DRY_RUN)); then
        die "${PYTHON} not found (set EDGEMOLE_PYTHON to another Python >= 3.11)"
    fi
}

install_user_and_dirs() {
    note "user ${SERVICE_USER} and ${STATE_DIR}"
    if getent passwd "${SERVICE_USER}" >/dev/null; then
        echo "    user ${SERVICE_USER} exists"
    else
        local group_opt=(--user-group)
        if getent group "${SERVICE_USER}" >/dev/null; then
            group_opt=(--gid "${SERVICE_USER}")
        fi
        run useradd --system "${group_opt[@]}" --home-dir "${STATE_DIR}" --no-create-home \
            --shell /usr/sbin/nologin --comment "edgemole edge client" "${SERVICE_USER}"
    fi
    run install -d -o "${SERVICE_USER}" -g "${SERVICE_USER}" -m 0750 \
        "${STATE_DIR}" "${STATE_DIR}/cache" "${STATE_DIR}/${CLIENT_ID}"
}

install_python() {
    note "Python virtual environment in ${VENV}"
    if dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'install ok installed'; then
        echo "    python3-venv is installed"
    else
        run apt-get update
        run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
    fi
    if [[ -x "${VENV}/bin/python" ]]; then
        echo "    ${VENV} exists"
    else
        run "${PYTHON}" -m venv "${VENV}"
    fi

    note "edgemole from ${SOURCE}"
    # torch: the CPU build. On arm64 that is what PyPI ships; the extra index also keeps an amd64 test
    # machine from pulling the multi-GB CUDA build. edgemole's own pin decides the version.
    local pip_args=(install --upgrade --disable-pip-version-check)
    if [[ -n "${TORCH_INDEX}" ]]; then
        pip_args+=(--extra-index-url "${TORCH_INDEX}")
    fi
    if [[ -n "${FIND_LINKS}" ]]; then
        pip_args+=(--find-links "${FIND_LINKS}")
    fi
    run "${VENV}/bin/pip" "${pip_args[@]}" "${SOURCE}"
    run "${VENV}/bin/edgemole" --version
}

install_unit() {
    note "systemd unit ${UNIT_DIR}/edgemole-client@.service"
    run install -m 0644 "${UNIT_SRC}" "${UNIT_DIR}/edgemole-client@.service"
    run systemctl daemon-reload
}

# sed_repl TEXT: TEXT escaped for the replacement side of a sed s|||.
sed_repl() {
    printf '%s' "$1" | sed -e 's/[&|\\]/\\&/g'
}

# Prints the env file for a new client, from client.env.example and the options.
new_env_file() {
    local data_path="$1" test_path="$2"
    local sed_args=(-E -e "s|CLIENT_ID|${CLIENT_ID}|g"
        -e "s|^EDGEMOLE_DATA=.*|EDGEMOLE_DATA=$(sed_repl "${data_path}")|")
    if [[ -n "${BROKER}" ]]; then
        sed_args+=(-e "s|^EDGEMOLE_BROKER=.*|EDGEMOLE_BROKER=$(sed_repl "${BROKER}")|")
    fi
    if [[ -n "${FLEET}" ]]; then
        sed_args+=(-e "s|^#?EDGEMOLE_FLEET=.*|EDGEMOLE_FLEET=${FLEET}|")
    fi
    if [[ -n "${CREDENTIALS}" ]]; then  # the broker, fleet and TLS settings of 'edgemole broker init'
        local var value
        for var in EDGEMOLE_BROKER EDGEMOLE_FLEET EDGEMOLE_TOPIC_PREFIX EDGEMOLE_MQTT_CA_FILE EDGEMOLE_MQTT_CERT_FILE \
            EDGEMOLE_MQTT_KEY_FILE; do
            value="$(env_value "${CREDENTIALS}/client.env" "${var}")"
            if [[ -n "${value}" && ! ( "${var}" == EDGEMOLE_BROKER && -n "${BROKER}" ) && \
                  ! ( "${var}" == EDGEMOLE_FLEET && -n "${FLEET}" ) ]]; then
                sed_args+=(-e "s|^#?${var}=.*|${var}=$(sed_repl "${value}")|")
            fi
        done
    fi
    if [[ -n "${THREADS}" ]]; then
        sed_args+=(-e "s|^#?EDGEMOLE_THREADS=.*|EDGEMOLE_THREADS=${THREADS}|")
    fi
    if [[ -n "${test_path}" ]]; then
        sed_args+=(-e "s|^#?EDGEMOLE_EXTRA_ARGS=.*|EDGEMOLE_EXTRA_ARGS=--test-data $(sed_repl "${test_path}")|")
    fi
    sed "${sed_args[@]}" "${ENV_EXAMPLE}"
}

# Sets DATA_PATH (where the env file says the training data is) and DATA_DST (where --data copies to).
DATA_PATH=""
DATA_DST=""
install_config_and_data() {
    local env_file="${CONF_DIR}/${CLIENT_ID}.env"
    local data_dst="" test_dst=""
    if [[ -n "${DATA_FILE}" ]]; then
        data_dst="${STATE_DIR}/${CLIENT_ID}/train.$(data_ext "${DATA_FILE}")"
    fi
    if [[ -n "${TEST_DATA_FILE}" ]]; then
        test_dst="${STATE_DIR}/${CLIENT_ID}/test.$(data_ext "${TEST_DATA_FILE}")"
    fi

    note "configuration ${env_file}"
    run install -d -m 0755 "${CONF_DIR}"
    if [[ -e "${env_file}" ]]; then
        echo "    ${env_file} exists: left as it is"
        DATA_PATH="$(env_value "${env_file}" EDGEMOLE_DATA)"
        if [[ -n "${BROKER}${FLEET}${THREADS}" ]]; then
            warn "--broker/--fleet/--threads only apply to a new env file; edit ${env_file} to change them"
        fi
        if [[ -n "${data_dst}" && "${data_dst}" != "${DATA_PATH}" ]]; then
            warn "${env_file} reads its data from '${DATA_PATH}', not from ${data_dst}; edit EDGEMOLE_DATA"
        fi
        if [[ -n "${test_dst}" ]] && ! grep -q -- "--test-data ${test_dst}" "${env_file}"; then
            warn "${env_file} does not pass --test-data ${test_dst}; edit EDGEMOLE_EXTRA_ARGS"
        fi
    else
        DATA_PATH="${data_dst:-${STATE_DIR}/${CLIENT_ID}/train.jsonl}"
        [[ -n "${BROKER}${CREDENTIALS}" ]] || warn "no --broker or --credentials given: ${env_file} gets a placeholder broker; edit it"
        new_env_file "${DATA_PATH}" "${test_dst}" | write_file "${env_file}" 0640 root "${SERVICE_USER}"
    fi

    if [[ -n "${CREDENTIALS}" ]]; then
        local cred_dir="${CONF_DIR}/${CLIENT_ID}"
        note "broker credentials ${cred_dir}"
        run install -d -o root -g "${SERVICE_USER}" -m 0750 "${cred_dir}"
        local cf
        for cf in ca.crt client.crt client.key password; do
            run install -o root -g "${SERVICE_USER}" -m 0640 "${CREDENTIALS}/${cf}" "${cred_dir}/${cf}"
        done
        if [[ -e "${env_file}" ]] && ! grep -q '^EDGEMOLE_MQTT_CERT_FILE=' "${env_file}" && ((!DRY_RUN)); then
            warn "${env_file} has no EDGEMOLE_MQTT_* settings; copy them from ${CREDENTIALS}/client.env"
        fi
    fi

    DATA_DST="${data_dst}"
    if [[ -n "${data_dst}" ]]; then
        note "training data ${data_dst}"
        run install -o "${SERVICE_USER}" -g "${SERVICE_USER}" -m 0640 "${DATA_FILE}" "${data_dst}"
    fi
    if [[ -n "${test_dst}" ]]; then
        note "test data ${test_dst}"
        run install -o "${SERVICE_USER}" -g "${SERVICE_USER}" -m 0640 "${TEST_DATA_FILE}" "${test_dst}"
    fi
}

enable_and_start() {
    local unit="edgemole-client@${CLIENT_ID}.service"
    note "service ${unit}"
    run systemctl enable "${unit}"
    if ((!START)); then
        echo "    not started (--no-start): systemctl start ${unit}"
    elif [[ -f "${DATA_PATH}" || (${DRY_RUN} -eq 1 && -n "${DATA_DST}" && "${DATA_DST}" == "${DATA_PATH}") ]]; then
        # A unit that hit its start limit refuses to start until its failed state is reset.
        # shellcheck disable=SC2310  # failing here (unit not loaded yet) is fine
        run systemctl reset-failed "${unit}" 2>/dev/null || true
        run systemctl restart "${unit}"
    else
        warn "data file '${DATA_PATH}' is not there yet: ${unit} is enabled but not started"
        echo "    copy the data (readable by ${SERVICE_USER}), then: systemctl start ${unit}"
    fi
    local done_msg="Done."
    if ((DRY_RUN)); then
        done_msg="Done (dry run: nothing was changed)."
    fi
    cat <<EOF

${done_msg}
  status:  systemctl status ${unit}
  logs:    journalctl -u ${unit} -f
  config:  ${CONF_DIR}/${CLIENT_ID}.env  (then: systemctl restart ${unit})
EOF
}

main() {
    parse_args "$@"
    check_args
    check_system
    if ((DRY_RUN)); then
        note "dry run: commands that would change the system are printed, not run"
    fi
    install_user_and_dirs
    install_python
    install_unit
    install_config_and_data
    enable_and_start
}

main "$@"

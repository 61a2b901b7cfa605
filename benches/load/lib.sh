# Helpers shared by run.sh and profile.sh (sourced; the caller defines `die`).

USED_PORTS=" "
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        [[ $p == 6379 || $USED_PORTS == *" $p "* ]] && continue
        [[ -z $(ss -Htln "sport = :$p") ]] || continue
        USED_PORTS+="$p "
        echo "$p"
        return
    done
}

wait_port() { # port [seconds [pid]]: fails early when pid exits
    local i
    for ((i = 0; i < ${2:-30} * 10; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        [[ -z ${3:-} ]] || kill -0 "$3" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

render() { # template output VAR=value...
    local template=$1 out=$2 kv args=()
    shift 2
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$template" >"$out"
    ! grep -q '@[A-Z_]*@' "$out" || die "unfilled placeholder in $out"
}

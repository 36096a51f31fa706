package xapisim

import "strings"

// xlScript is the simulator's stand-in for dom0's xl (Xen's toolstack
// CLI): a POSIX sh script using only shell builtins and cat, mkdir and rm.
// @ROOT@ and @HOST@ are replaced (single-quoted) when it is written.
//
// Output formats follow xl 4.17 (tools/xl/xl_info.c, xl_sched.c): `xl
// info` prints "%-23s: %s" lines; `xl sched-credit[2] -d D` prints the
// header "%-33s %4s %6s %4s" (Name ID Weight Cap) and one row; setting
// prints nothing.
const xlScript = `#!/bin/sh
# xl stand-in written by the wanmotion xapi simulator (xapi/xapisim) for
# host @HOST@. It implements only:
#   xl info
#   xl sched-credit|sched-credit2 [-d DOMAIN] [-w WEIGHT] [-c CAP]
# State under $XL_SIM (<root>/var/lib/xl-sim):
#   domains/<domid>  the running domains (content: the VM uuid), kept by the simulator
#   sched/<domid>    "weight cap" of a domain (absent: 256 0)
#   scheduler        credit or credit2 (absent: credit, and then both
#                    sched-credit and sched-credit2 are accepted)
ROOT=@ROOT@
HOST=@HOST@
XL_SIM="$ROOT/var/lib/xl-sim"

err() {
	printf '%s\n' "$*" >&2
}

is_uint() {
	case $1 in
	'' | *[!0-9]*) return 1 ;;
	esac
	return 0
}

# norm N: N without leading zeros.
norm() {
	n=$1
	while :; do
		case $n in
		0?*) n=${n#0} ;;
		*) break ;;
		esac
	done
	printf '%s' "$n"
}

# scheduler: the host's scheduler; "" when not set (credit, lenient).
scheduler() {
	if [ -f "$XL_SIM/scheduler" ]; then
		s=$(cat "$XL_SIM/scheduler")
		case $s in
		credit | credit2)
			printf '%s' "$s"
			return 0
			;;
		esac
	fi
	return 0
}

usage() {
	cat <<'EOF'
Usage xl [-vfNtT] <subcommand> [args]

xl full list of subcommands (simulator stand-in):

 info                Get information about Xen host
 sched-credit        Get/set credit scheduler parameters
 sched-credit2       Get/set credit2 scheduler parameters
EOF
}

sched_usage() {
	cat <<EOF
Usage: xl $1 [-d <Domain> [-w[=WEIGHT]|-c[=CAP]]]

Get/set $2 scheduler parameters.

Options:

-d DOMAIN, --domain=DOMAIN     Domain to modify
-w WEIGHT, --weight=WEIGHT     Weight (int)
-c CAP, --cap=CAP              Cap (int)
EOF
}

cmd_info() {
	sched=$(scheduler)
	printf '%-23s: %s\n' \
		host "$HOST" \
		release 4.19.0+1 \
		version '#1 SMP Tue Jan 23 14:12:55 CET 2024' \
		machine x86_64 \
		nr_cpus 4 \
		max_cpu_id 3 \
		nr_nodes 1 \
		cores_per_socket 4 \
		threads_per_core 1 \
		cpu_mhz 2394.454 \
		hw_caps 'bfebfbff:77fafbff:2c100800:00000121:0000000f:009c6fbf:00000000:00000100' \
		virt_caps 'pv hvm hvm_directio pv_directio hap shadow' \
		total_memory 16383 \
		free_memory 8191 \
		sharing_freed_memory 0 \
		sharing_used_memory 0 \
		outstanding_claims 0 \
		free_cpus 0 \
		xen_major 4 \
		xen_minor 17 \
		xen_extra .5-6 \
		xen_version 4.17.5-6 \
		xen_caps 'xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64' \
		xen_scheduler "${sched:-credit}" \
		xen_pagesize 4096 \
		platform_params virt_start=0xffff800000000000 \
		xen_changeset '' \
		xen_commandline 'dom0_mem=4304M,max:4304M watchdog ucode=scan dom0_max_vcpus=1-4 crashkernel=256M,below=4G console=vga vga=mode-0x0311' \
		cc_compiler 'gcc (GCC) 11.2.1 20210728 (Red Hat 11.2.1-1)' \
		cc_compile_by mockbuild \
		cc_compile_domain '[unknown]' \
		cc_compile_date 'Tue Jan 23 14:12:55 CET 2024' \
		build_id 6c3b1e9f1c1d4f0e8a7d2b5c9e0f1a2b3c4d5e6f \
		xend_config_format 4
}

# resolve DOMAIN: prints the domid of a running domain given by id or
# name; otherwise reports as xl does and fails.
resolve() {
	if is_uint "$1"; then
		norm "$1"
		return 0
	fi
	if [ "$1" = Domain-0 ] && [ -f "$XL_SIM/domains/0" ]; then
		printf 0
		return 0
	fi
	for f in "$XL_SIM"/domains/*; do
		[ -f "$f" ] || continue
		if [ "$(cat "$f")" = "$1" ]; then
			printf '%s' "${f##*/}"
			return 0
		fi
	done
	err "$1 is an invalid domain identifier (rc=-6)"
	return 1
}

# domain_name DOMID
domain_name() {
	if [ "$1" = 0 ]; then
		printf Domain-0
	else
		cat "$XL_SIM/domains/$1"
	fi
}

# sched_read DOMID: sets w and c.
sched_read() {
	w=256
	c=0
	if [ -f "$XL_SIM/sched/$1" ]; then
		set -- $(cat "$XL_SIM/sched/$1")
		if is_uint "$1" && is_uint "$2"; then
			w=$1
			c=$2
		fi
	fi
}

# row DOMID
row() {
	sched_read "$1"
	printf '%-33s %4d %6d %4d\n' "$(domain_name "$1")" "$1" "$w" "$c"
}

cmd_sched() {
	sub=$1
	want=${sub#sched-}
	name=$want
	[ "$want" = credit2 ] && name=Credit2
	[ "$want" = credit ] && name=Credit
	shift
	dom=
	weight=
	cap=
	opt_w=
	opt_c=
	while [ $# -gt 0 ]; do
		o=$1
		v=
		case $o in
		--domain=* | --weight=* | --cap=*)
			v=${o#*=}
			o=${o%%=*}
			;;
		-d?* | -w?* | -c?*)
			v=${o#-?}
			o=${o%"$v"}
			;;
		-d | -w | -c | --domain | --weight | --cap)
			if [ $# -lt 2 ]; then
				err "xl: option requires an argument -- '${o##*-}'"
				sched_usage "$sub" "$name" >&2
				exit 1
			fi
			v=$2
			shift
			;;
		-h | --help)
			sched_usage "$sub" "$name"
			exit 0
			;;
		*)
			err "xl: unrecognized option '$o'"
			sched_usage "$sub" "$name" >&2
			exit 1
			;;
		esac
		shift
		case $o in
		-d | --domain) dom=$v ;;
		-w | --weight)
			weight=$v
			opt_w=1
			;;
		-c | --cap)
			cap=$v
			opt_c=1
			;;
		esac
	done
	sched=$(scheduler)
	if [ -z "$dom" ]; then
		if [ -n "$opt_w$opt_c" ]; then
			err "Must specify a domain."
			exit 1
		fi
		if [ -n "$sched" ] && [ "$sched" != "$want" ]; then
			exit 0 # real xl lists no cpupool with another scheduler
		fi
		if [ "$want" = credit ]; then
			echo "Cpupool Pool-0: tslice=30ms ratelimit=1000us migration-delay=0us"
		else
			echo "Cpupool Pool-0: ratelimit=1000us"
		fi
		printf '%-33s %4s %6s %4s\n' Name ID Weight Cap
		# Numeric order: one, two, ... five digits.
		for pat in '[0-9]' '[0-9][0-9]' '[0-9][0-9][0-9]' '[0-9][0-9][0-9][0-9]' '[0-9][0-9][0-9][0-9][0-9]'; do
			for f in "$XL_SIM"/domains/$pat; do
				[ -f "$f" ] && row "${f##*/}"
			done
		done
		exit 0
	fi
	d=$(resolve "$dom") || exit 1
	if [ -n "$opt_w" ]; then
		if ! is_uint "$weight" || [ ${#weight} -gt 5 ] || [ "$(norm "$weight")" -lt 1 ] || [ "$(norm "$weight")" -gt 65535 ]; then
			err "libxl: error: libxl_sched.c:238:sched_credit_domain_set: Domain $d:Cpu weight out of range, valid values are within range from 1 to 65535"
			err "libxl_domain_sched_params_set failed."
			exit 1
		fi
		weight=$(norm "$weight")
	fi
	if [ -n "$opt_c" ]; then
		if ! is_uint "$cap" || [ ${#cap} -gt 5 ] || [ "$(norm "$cap")" -gt 65535 ]; then
			err "xl: invalid cap '$cap': want a whole number of percent of one CPU, 0 for no cap"
			exit 1
		fi
		cap=$(norm "$cap")
	fi
	if [ ! -f "$XL_SIM/domains/$d" ]; then
		if [ -n "$opt_w$opt_c" ]; then
			err "libxl: error: libxl_sched.c:228:sched_${want}_domain_set: Domain $d:Getting domain info: invalid domain identifier (no such domain)"
			err "libxl_domain_sched_params_set failed."
		else
			err "libxl: error: libxl_sched.c:212:sched_${want}_domain_get: Domain $d:Getting domain sched ${want}: invalid domain identifier (no such domain)"
			err "libxl_domain_sched_params_get failed."
		fi
		exit 1
	fi
	if [ -n "$sched" ] && [ "$sched" != "$want" ]; then
		if [ -n "$opt_w$opt_c" ]; then
			err "libxl: error: libxl_sched.c:240:sched_${want}_domain_set: Domain $d:Setting domain sched ${want}: Invalid argument"
			err "libxl_domain_sched_params_set failed."
		else
			err "libxl_domain_sched_params_get returned $sched not $want."
		fi
		exit 1
	fi
	if [ -z "$opt_w$opt_c" ]; then
		printf '%-33s %4s %6s %4s\n' Name ID Weight Cap
		row "$d"
		exit 0
	fi
	sched_read "$d"
	[ -n "$opt_w" ] && w=$weight
	[ -n "$opt_c" ] && c=$cap
	mkdir -p "$XL_SIM/sched" || exit 1
	printf '%s %s\n' "$w" "$c" >"$XL_SIM/sched/$d" || exit 1
	exit 0
}

# Global options before the subcommand are accepted and ignored.
while [ $# -gt 0 ]; do
	case $1 in
	-v | -f | -N | -t | -T) shift ;;
	*) break ;;
	esac
done
if [ $# -eq 0 ]; then
	usage >&2
	exit 1
fi
cmd=$1
shift
case $cmd in
info) cmd_info ;;
sched-credit | sched-credit2) cmd_sched "$cmd" "$@" ;;
help) usage ;;
*)
	err "command not implemented"
	exit 1
	;;
esac
`

// shQuote single-quotes s for sh.
func shQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// renderXLScript returns the xl stand-in for a host whose root is root.
func renderXLScript(root, host string) string {
	return strings.NewReplacer("@ROOT@", shQuote(root), "@HOST@", shQuote(host)).Replace(xlScript)
}

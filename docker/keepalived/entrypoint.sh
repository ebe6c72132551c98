#!/bin/sh
# Write keepalived.conf for one member of the sluice pair from the
# environment, then run keepalived in the foreground.
#
#   VIP             the floating address (no prefix)
#   VIP_PREFIX      its prefix length on the network (default 24)
#   SELF, PEER      this member's and the other member's own addresses
#   PRIORITY        VRRP priority; the higher one takes the address first
#   PREEMPT         "true": a member that comes back takes the address back
#                   from a lower priority one; default "false" (no flap back)
#   ADMIN           sluice's admin listener in this namespace (default 127.0.0.1:9100)
#   ADVERT_INT      VRRPv3 advertisement interval in seconds (default 1)
#   CHECK_FALL      failed readiness checks (1 s apart) before giving up the address (default 1)
#   CHECK_RISE      passing checks before it may hold the address again (default 2)
set -eu
: "${VIP:?}" "${SELF:?}" "${PEER:?}" "${PRIORITY:?}"
prefix=${VIP_PREFIX:-24}
admin=${ADMIN:-127.0.0.1:9100}
preempt=nopreempt
[ "${PREEMPT:-false}" = true ] && preempt="# preempt (PREEMPT=true)"

# Connections outlive a move of the address. Each member's conntrack tells
# its own connections (it saw their SYN) from the others': a packet that is
# not a SYN yet opens a conntrack entry here (a loose pickup), or that
# conntrack cannot place at all (a FIN or RST out of nowhere) and that no
# socket here owns, belongs to a connection the other member accepted,
# before the address moved or from a client whose ARP cache is behind. Such
# a connection is marked (ct mark, where conntrack keeps one) and its packets
# are routed to the other member, tagged (DSCP CS7) so that they are never
# sent back: the receiver delivers them to its own socket, or answers RST
# when there is none. Every member also keeps the address on lo, where no
# ARP answers for it (arp_ignore/arp_announce in the compose sysctls), so
# its sockets still receive and send on it after it moved. A draining sluice
# finishes its requests that way; new connections (SYN) always stay with
# whoever receives them.
ip addr add "$VIP/32" dev lo 2>/dev/null || true
# Marked packets are routed to the peer before the local table would
# deliver them here: the local table moves from priority 0 to 20.
ip rule add fwmark 0x14 lookup 14 priority 10
ip rule add lookup local priority 20
ip rule del priority 0 lookup local
ip route add default via "$PEER" dev eth0 table 14
nft -f - <<NFT
table ip sluice_vrrp {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        ip daddr $VIP ip dscp cs7 counter return
        ip daddr $VIP ct mark 0x14 counter goto handover
        ip daddr $VIP tcp flags & syn == 0 ct state new counter goto handover
        ip daddr $VIP tcp flags & syn == 0 ct state invalid socket wildcard 0 counter return
        ip daddr $VIP tcp flags & syn == 0 ct state invalid counter goto handover
    }
    chain handover {
        meta mark set 0x14 ip dscp set cs7 ct mark set 0x14
    }
}
NFT

# The VRRP state, kept by notify.sh as keepalived_script (the image makes
# /run/vrrp its own); keepalived starts in FAULT (init_fail).
setpriv --reuid=keepalived_script --regid=keepalived_script --clear-groups \
	sh -c 'umask 022; echo FAULT >/run/vrrp/state'

mkdir -p /etc/keepalived
cat >/etc/keepalived/keepalived.conf <<CONF
global_defs {
    router_id $(hostname)
    script_user keepalived_script
    enable_script_security
    vrrp_garp_master_refresh 5
}

vrrp_script sluice_ready {
    script "/usr/local/bin/sluice healthcheck --admin $admin --timeout 1500ms"
    interval 1
    timeout 2
    fall ${CHECK_FALL:-1}
    rise ${CHECK_RISE:-2}
    init_fail
}

vrrp_instance sluice {
    state BACKUP
    $preempt
    interface eth0
    version 3
    virtual_router_id 14
    priority $PRIORITY
    advert_int ${ADVERT_INT:-1}
    unicast_src_ip $SELF
    unicast_peer {
        $PEER
    }
    virtual_ipaddress {
        $VIP/$prefix dev eth0
    }
    track_script {
        sluice_ready
    }
    notify /usr/local/bin/vrrp-notify
}
CONF
exec keepalived --dont-fork --log-console --log-detail --vrrp -f /etc/keepalived/keepalived.conf

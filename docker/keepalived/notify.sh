#!/bin/sh
# keepalived's notify script (runs as keepalived_script): records this
# member's VRRP state (MASTER, BACKUP, FAULT, STOP) in /run/vrrp/state, where
# scripts/stack.py and the drills read it. Arguments: TYPE NAME STATE PRIORITY.
umask 022
printf '%s\n' "${3:-UNKNOWN}" >/run/vrrp/state.new && mv /run/vrrp/state.new /run/vrrp/state

#!/bin/sh
# Make the TEST certificates conf/https.yaml names, in DIR: a CA, leaves for
# www.example.com and api.example.com, a client CA and a client certificate
# for sluice. For trying the example and for `make check-config`; never use
# these keys for anything real.
set -eu
dir=${1:?usage: scripts/demo-certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
ca() { # name file-stem
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
		-subj "/CN=$1" -keyout "$2.key" -out "$2.pem" 2>/dev/null
}
leaf() { # name ca-stem
	openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
		-keyout "$1.key" -out "$1.csr" 2>/dev/null
	printf 'subjectAltName=DNS:%s\n' "$1" >"$1.ext"
	openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days 30 \
		-extfile "$1.ext" -out "$1.pem" 2>/dev/null
	rm -f "$1.csr" "$1.ext"
}
ca "sluice demo CA" ca
ca "sluice demo client CA" clients-ca
leaf www.example.com ca
leaf api.example.com ca
leaf sluice-client clients-ca
chmod 600 ./*.key
echo "test certificates in $dir"

# lib.sh: what the benchmark and demo scripts share. Source it from the
# repository's root (the scripts cd there first); it runs nothing itself.

# bench_layers sets small and large to the cached Debian layers the
# benchmarks use (about 64 MB and >= 200 MB of gzip) in $CACHE, builds
# them if missing (scripts/debian-layer.sh), and builds bin/indexer.
bench_layers() {
  small=$CACHE/debian-python3.tar.gz
  large=$CACHE/debian-scipy.tar.gz
  scripts/debian-layer.sh "$small" python3
  scripts/debian-layer.sh "$large" python3 python3-numpy python3-scipy python3-pandas python3-sklearn \
    python3-matplotlib python3-sympy gcc g++ gfortran
  go build -o bin/indexer ./cmd/indexer
}

# median prints the median of the first field of the lines on stdin.
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# free_port prints a free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# registry_config STORAGE PORT SECRET prints a docker-registry config:
# filesystem storage in STORAGE, listening on 127.0.0.1:PORT, errors only
# in its log.
registry_config() {
  cat <<EOC
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $1}}
http: {addr: 127.0.0.1:$2, secret: $3}
EOC
}

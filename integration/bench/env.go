//go:build linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spanpull/spanpull/integration/testenv"
)

// Names the harness gives containerd objects.
const (
	snapshotterName = "spanpull"
	ctrNamespace    = "bench"
	// systemPath is what containerd and ctr run with: Debian's runc and
	// shim, never a containerd 2 shim from ~/go/bin.
	systemPath = "/usr/sbin:/usr/bin:/sbin:/bin"
)

// env is everything one benchmark needs, all below one temporary
// directory: a registry in its own network namespace behind a shaped veth
// link and the delay proxy, spanpull's snapshotter, and containerd 1.6.
// Close stops every process by PID, deletes the namespace and unmounts and
// removes the directory, whatever state setup or a run stopped in.
type env struct {
	dir  string
	keep bool
	logf func(format string, args ...any)

	cleanups []func() error

	netns          string
	hostIf, nsIf   string
	hostIP, nsIP   string
	registryAddr   string // direct, rate-limited only (push, index)
	proxyAddr      string // the path pulls use: rate + delay, counted
	proxy          *proxyClient
	snapshotterBin string
	indexerBin     string
	spanSize       int64 // --span-size for indexer convert; 0: the indexer's default
	snapConfig     string
	snapSock       string
	snapRoot       string
	metricsAddr    string
	snap           *process
	snapStarts     int
	containerd     *process
	ctrSock        string
}

// process is a daemon the harness started.
type process struct {
	name   string
	cmd    *exec.Cmd
	logf   string
	exited chan struct{}
	err    error
}

func (e *env) start(name string, cmd *exec.Cmd) (*process, error) {
	if err := os.MkdirAll(filepath.Join(e.dir, "logs"), 0o755); err != nil {
		return nil, err
	}
	logPath := filepath.Join(e.dir, "logs", name+".log")
	for i := 2; ; i++ {
		if _, err := os.Stat(logPath); os.IsNotExist(err) {
			break
		}
		logPath = filepath.Join(e.dir, "logs", fmt.Sprintf("%s.%d.log", name, i))
	}
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = f, f
	// Die with the harness, whatever happens to it, but not with a
	// terminal's ^C to its process group: the harness stops daemons in
	// order (containers, containerd, snapshotter) when it is interrupted.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, logf: logPath, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.exited)
	}()
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

func (p *process) done() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, then SIGKILL after grace.
func (p *process) stop(grace time.Duration) error {
	if p == nil || p.done() {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(grace):
		_ = p.cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("%s (pid %d) ignored SIGTERM for %v: killed", p.name, p.pid(), grace)
	}
}

// logTail returns the end of the process's log, for error messages.
func (p *process) logTail() string {
	b, _ := os.ReadFile(p.logf)
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return string(b)
}

// waitReady polls ready until it succeeds, p exits or timeout passes.
func waitReady(ctx context.Context, p *process, timeout time.Duration, ready func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if p != nil && p.done() {
			return fmt.Errorf("%s exited before it was ready (%v); log:\n%s", p.name, err, p.logTail())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %v: %w", timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (e *env) onClose(f func() error) { e.cleanups = append(e.cleanups, f) }

// Close undoes setup in reverse order and reports every failure.
func (e *env) Close() error {
	var errs []error
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		if err := e.cleanups[i](); err != nil {
			errs = append(errs, err)
		}
	}
	e.cleanups = nil
	return errors.Join(errs...)
}

// run runs a command and returns its combined output; the error carries it.
func run(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// newEnv creates the directory and the network namespace. dirBase is where
// the temporary directory goes ("" for the system default).
func newEnv(ctx context.Context, dirBase string, keep bool, logf func(string, ...any)) (*env, error) {
	dir, err := os.MkdirTemp(dirBase, "spanpull-bench-")
	if err != nil {
		return nil, err
	}
	e := &env{dir: dir, keep: keep, logf: logf}
	e.onClose(func() error {
		if err := testenv.UnmountUnder(dir); err != nil {
			return fmt.Errorf("unmount leftovers in %s (not removed): %w", dir, err)
		}
		if e.keep {
			logf("kept %s", dir)
			return nil
		}
		return os.RemoveAll(dir)
	})
	if err := e.setupNetns(ctx); err != nil {
		return e, err
	}
	return e, nil
}

// freeSubnet picks the first /30 of 198.18.0.0/24 no local interface uses
// (198.18.0.0/30 unless another benchmark or test holds it).
func freeSubnet() (host, ns string, err error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", "", err
	}
	used := map[int]bool{}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip4 := ipn.IP.To4()
		if ip4 != nil && ip4[0] == 198 && ip4[1] == 18 && ip4[2] == 0 {
			used[int(ip4[3])/4] = true
		}
	}
	for b := 0; b < 64; b++ {
		if !used[b] {
			return fmt.Sprintf("198.18.0.%d", 4*b+1), fmt.Sprintf("198.18.0.%d", 4*b+2), nil
		}
	}
	return "", "", errors.New("no free /30 in 198.18.0.0/24")
}

func (e *env) setupNetns(ctx context.Context) error {
	id := strconv.Itoa(os.Getpid())
	e.netns = "spbench-" + id
	e.hostIf, e.nsIf = "spb"+id+"h", "spb"+id+"r" // <= 15 bytes
	var err error
	if e.hostIP, e.nsIP, err = freeSubnet(); err != nil {
		return err
	}
	if _, err := run(ctx, "ip", "netns", "add", e.netns); err != nil {
		return err
	}
	e.onClose(func() error {
		// Deleting the namespace (its processes are gone by now) also
		// deletes the veth pair.
		_, err := run(context.Background(), "ip", "netns", "del", e.netns)
		return err
	})
	steps := [][]string{
		{"ip", "link", "add", e.hostIf, "type", "veth", "peer", "name", e.nsIf},
		{"ip", "link", "set", e.nsIf, "netns", e.netns},
		{"ip", "addr", "add", e.hostIP + "/30", "dev", e.hostIf},
		{"ip", "link", "set", e.hostIf, "up"},
		{"ip", "-n", e.netns, "addr", "add", e.nsIP + "/30", "dev", e.nsIf},
		{"ip", "-n", e.netns, "link", "set", e.nsIf, "up"},
		{"ip", "-n", e.netns, "link", "set", "lo", "up"},
	}
	for _, s := range steps {
		if _, err := run(ctx, s[0], s[1:]...); err != nil {
			if s[1] == "link" && s[2] == "add" {
				return err
			}
			_, _ = run(context.Background(), "ip", "link", "del", e.hostIf)
			return err
		}
	}
	e.registryAddr = e.nsIP + ":5000"
	e.proxyAddr = e.nsIP + ":5001"
	return nil
}

// shape sets the link's rate on both veth ends (tbf; "" removes shaping)
// and the proxy's one-way delay (RTT/2).
func (e *env) shape(ctx context.Context, rate string, rtt time.Duration) error {
	burst := "256kb" // must exceed one GSO super-packet (64 KiB)
	if bits, err := parseRate(rate); err == nil && bits >= 500e6 {
		burst = "1mb"
	}
	for _, side := range [][]string{{"tc"}, {"ip", "netns", "exec", e.netns, "tc"}} {
		dev := e.hostIf
		if len(side) > 1 {
			dev = e.nsIf
		}
		del := append(append([]string{}, side[1:]...), "qdisc", "del", "dev", dev, "root")
		_, _ = run(ctx, side[0], del...) // none yet is fine
		if rate == "" {
			continue
		}
		add := append(append([]string{}, side[1:]...), "qdisc", "add", "dev", dev, "root",
			"tbf", "rate", rate, "burst", burst, "latency", "50ms")
		if _, err := run(ctx, side[0], add...); err != nil {
			return err
		}
	}
	return e.proxy.SetDelay(ctx, rtt/2)
}

// parseRate parses a tc rate like "100mbit" into bits per second.
func parseRate(s string) (float64, error) {
	units := []struct {
		suffix string
		mult   float64
	}{{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}, {"bit", 1}}
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			v, err := strconv.ParseFloat(strings.TrimSuffix(s, u.suffix), 64)
			if err != nil || v <= 0 {
				return 0, fmt.Errorf("bad rate %q", s)
			}
			return v * u.mult, nil
		}
	}
	return 0, fmt.Errorf("bad rate %q (want e.g. 100mbit, 1gbit)", s)
}

// startRegistry runs docker-registry inside the namespace on :5000 and the
// delay proxy in front of it on :5001.
func (e *env) startRegistry(ctx context.Context) error {
	cfg := filepath.Join(e.dir, "registry.yml")
	conf := fmt.Sprintf(`version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: %s}, delete: {enabled: true}}
http: {addr: "0.0.0.0:5000", secret: bench}
`, filepath.Join(e.dir, "registry"))
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return err
	}
	reg, err := e.start("registry", exec.Command("ip", "netns", "exec", e.netns, "docker-registry", "serve", cfg))
	if err != nil {
		return err
	}
	e.onClose(func() error { return reg.stop(10 * time.Second) })
	url := "http://" + e.registryAddr + "/v2/"
	if err := waitReady(ctx, reg, 20*time.Second, func() error { return httpOK(ctx, url) }); err != nil {
		return fmt.Errorf("registry: %w", err)
	}

	self, err := os.Executable()
	if err != nil {
		return err
	}
	ctl := filepath.Join(e.dir, "proxy.sock")
	px, err := e.start("proxy", exec.Command("ip", "netns", "exec", e.netns, self, "proxy",
		"-listen", e.proxyAddr, "-upstream", "127.0.0.1:5000", "-control", ctl))
	if err != nil {
		return err
	}
	e.onClose(func() error { return px.stop(10 * time.Second) })
	e.proxy = newProxyClient(ctl)
	if err := waitReady(ctx, px, 20*time.Second, func() error {
		_, err := e.proxy.Stats(ctx)
		return err
	}); err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	return httpOK(ctx, "http://"+e.proxyAddr+"/v2/")
}

func httpOK(ctx context.Context, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// freePort returns a loopback TCP port nobody listens on right now.
func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// startSnapshotter writes the daemon's config and starts it with an empty
// root. fill enables background fill with the daemon's defaults.
func (e *env) startSnapshotter(ctx context.Context, fill bool) error {
	var b strings.Builder
	fmt.Fprintf(&b, "log_level = \"info\"\n[remote]\n  plain_http = [%q]\n  fetch_timeout_seconds = 120\n", e.proxyAddr)
	if !fill {
		b.WriteString("  fill_rate_bytes = -1\n")
	}
	e.snapConfig = filepath.Join(e.dir, "snapshotter.toml")
	if err := os.WriteFile(e.snapConfig, []byte(b.String()), 0o600); err != nil {
		return err
	}
	e.snapSock = filepath.Join(e.dir, "snap.sock")
	var err error
	if e.metricsAddr, err = freePort(); err != nil {
		return err
	}
	e.onClose(func() error { return e.stopSnapshotter() })
	return e.restartSnapshotter(ctx)
}

func (e *env) stopSnapshotter() error {
	if e.snap == nil {
		return nil
	}
	err := e.snap.stop(20 * time.Second)
	e.snap = nil
	if e.snapRoot != "" {
		if uerr := testenv.UnmountUnder(e.snapRoot); uerr != nil {
			return errors.Join(err, uerr)
		}
		if rerr := os.RemoveAll(e.snapRoot); rerr != nil {
			return errors.Join(err, rerr)
		}
	}
	return err
}

// restartSnapshotter stops the daemon if it runs, deletes its root (every
// cached span and zTOC) and starts it again on the same socket with a new,
// empty root.
func (e *env) restartSnapshotter(ctx context.Context) error {
	if err := e.stopSnapshotter(); err != nil {
		return fmt.Errorf("stop snapshotter: %w", err)
	}
	e.snapStarts++
	e.snapRoot = filepath.Join(e.dir, fmt.Sprintf("snap-root-%d", e.snapStarts))
	p, err := e.start("snapshotter", exec.Command(e.snapshotterBin, "serve", "--config", e.snapConfig,
		"--address", e.snapSock, "--root", e.snapRoot, "--metrics-address", e.metricsAddr))
	if err != nil {
		return err
	}
	e.snap = p
	err = waitReady(ctx, p, 30*time.Second, func() error {
		c, err := net.DialTimeout("unix", e.snapSock, time.Second)
		if err != nil {
			return err
		}
		c.Close()
		return httpOK(ctx, "http://"+e.metricsAddr+"/metrics")
	})
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	if e.containerd != nil {
		// containerd reconnects to the proxy plugin on its own; wait until
		// it does, so the first measured call does not pay for it.
		err := waitReady(ctx, e.containerd, 60*time.Second, func() error {
			_, err := e.ctr(ctx, "snapshots", "--snapshotter", snapshotterName, "ls")
			return err
		})
		if err != nil {
			return fmt.Errorf("containerd reconnecting to the restarted snapshotter: %w", err)
		}
	}
	return nil
}

// startContainerd starts Debian's containerd 1.6 with the snapshotter as a
// proxy plugin (the snapshotter must run first: 1.6 fails its first calls to
// a proxy whose socket is missing at start-up).
func (e *env) startContainerd(ctx context.Context) error {
	for _, b := range []string{"/usr/bin/containerd", "/usr/bin/ctr", "/usr/bin/containerd-shim-runc-v2"} {
		if _, err := os.Stat(b); err != nil {
			return fmt.Errorf("containerd 1.6 not installed (%v): run scripts/install-deps.sh", err)
		}
	}
	e.ctrSock = filepath.Join(e.dir, "containerd.sock")
	conf := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[proxy_plugins.%s]
  type = "snapshot"
  address = %q
`, filepath.Join(e.dir, "containerd-root"), filepath.Join(e.dir, "containerd-state"),
		e.ctrSock, e.ctrSock+".ttrpc", snapshotterName, e.snapSock)
	cfg := filepath.Join(e.dir, "containerd.toml")
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return err
	}
	cmd := exec.Command("/usr/bin/containerd", "--config", cfg)
	cmd.Env = append(testenv.EnvWithout("PATH"), "PATH="+systemPath)
	// Cleanups run last-in first-out: shims after containerd, containerd
	// after its containers.
	e.onClose(func() error { killShims(e.ctrSock); return nil })
	p, err := e.start("containerd", cmd)
	if err != nil {
		return err
	}
	e.containerd = p
	e.onClose(func() error { return p.stop(20 * time.Second) })
	e.onClose(func() error {
		if p.done() {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		return e.removeAll(ctx)
	})
	return waitReady(ctx, p, 30*time.Second, func() error {
		_, err := e.ctr(ctx, "version")
		return err
	})
}

// ctrCmd prepares a ctr command against the harness's containerd.
func (e *env) ctrCmd(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "/usr/bin/ctr", append([]string{"-a", e.ctrSock, "-n", ctrNamespace}, args...)...)
	cmd.Env = append(testenv.EnvWithout("PATH", "CONTAINERD_NAMESPACE", "CONTAINERD_ADDRESS"), "PATH="+systemPath)
	return cmd
}

// ctr runs ctr and returns its combined output; the error carries it.
func (e *env) ctr(ctx context.Context, args ...string) (string, error) {
	cmd := e.ctrCmd(ctx, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("ctr %s: %w\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// removeAll kills and deletes every task and container and deletes every
// image synchronously (garbage collection then removes their content and
// snapshots).
func (e *env) removeAll(ctx context.Context) error {
	var errs []error
	out, _ := e.ctr(ctx, "tasks", "ls", "-q")
	for _, id := range strings.Fields(out) {
		_, _ = e.ctr(ctx, "tasks", "kill", "-s", "SIGKILL", id)
		if _, err := e.ctr(ctx, "tasks", "rm", "-f", id); err != nil {
			errs = append(errs, err)
		}
	}
	out, _ = e.ctr(ctx, "containers", "ls", "-q")
	for _, id := range strings.Fields(out) {
		if _, err := e.ctr(ctx, "containers", "rm", id); err != nil {
			errs = append(errs, err)
		}
	}
	out, err := e.ctr(ctx, "images", "ls", "-q")
	if err != nil {
		errs = append(errs, err)
	}
	if refs := strings.Fields(out); len(refs) > 0 {
		if _, err := e.ctr(ctx, append([]string{"images", "rm", "--sync"}, refs...)...); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// leftovers lists content and snapshots still in containerd after
// removeAll; a cold run needs none.
func (e *env) leftovers(ctx context.Context) (string, error) {
	var b strings.Builder
	out, err := e.ctr(ctx, "content", "ls", "-q")
	if err != nil {
		return "", err
	}
	if n := len(strings.Fields(out)); n > 0 {
		fmt.Fprintf(&b, "%d content blobs; ", n)
	}
	for _, sn := range []string{"overlayfs", snapshotterName} {
		out, err := e.ctr(ctx, "snapshots", "--snapshotter", sn, "ls")
		if err != nil {
			return "", err
		}
		if n := len(strings.Split(strings.TrimSpace(out), "\n")) - 1; n > 0 {
			fmt.Fprintf(&b, "%d %s snapshots; ", n, sn)
		}
	}
	return b.String(), nil
}

// killShims kills the runc shims of the containerd listening on socket
// (they outlive containerd by design), found by the socket among their
// arguments.
func killShims(socket string) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for _, a := range strings.Split(string(b), "\x00") {
			if a == socket {
				if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && err != syscall.ESRCH {
					log.Printf("kill shim %d: %v", pid, err)
				}
				break
			}
		}
	}
}

// dropCaches writes dirty pages back and drops the page cache, dentries
// and inodes, so no run reads the image's files from memory.
func dropCaches() error {
	syscall.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200)
}

// procUsage reads a process's peak resident set (VmHWM, bytes) and the CPU
// time it has used (user + system, seconds).
func procUsage(pid int) (peakRSS int64, cpu float64, err error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				return 0, 0, fmt.Errorf("parse VmHWM of %d: %w", pid, err)
			}
			peakRSS = kb << 10
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// Fields after the command name (which may hold spaces) in ")": state
	// is field 3, utime and stime are fields 14 and 15.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat times", pid)
	}
	const clkTck = 100 // USER_HZ on Linux
	return peakRSS, float64(ut+st) / clkTck, nil
}

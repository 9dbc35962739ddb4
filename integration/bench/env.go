//go:build linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/internal/proc"
	"github.com/spanpull/spanpull/registry/registrytest"
)

// Names the harness gives containerd objects.
const (
	snapshotterName = "spanpull"
	ctrNamespace    = "bench"
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
	snap           *testenv.Snapshotter
	snapRoot       string
	snapStarts     int
	containerd     *testenv.Containerd
	// client talks to containerd for the bookkeeping between runs (one
	// connection, not a ctr process per call); the measured pulls and
	// runs use ctr.
	client *containerd.Client
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
	if _, err := proc.CombinedOutput(ctx, "ip", "netns", "add", e.netns); err != nil {
		return err
	}
	e.onClose(func() error {
		// Deleting the namespace (its processes are gone by now) also
		// deletes the veth pair.
		_, err := proc.CombinedOutput(context.Background(), "ip", "netns", "del", e.netns)
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
		if _, err := proc.CombinedOutput(ctx, s[0], s[1:]...); err != nil {
			if s[1] == "link" && s[2] == "add" {
				return err
			}
			_, _ = proc.CombinedOutput(context.Background(), "ip", "link", "del", e.hostIf)
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
		_, _ = proc.CombinedOutput(ctx, side[0], del...) // none yet is fine
		if rate == "" {
			continue
		}
		add := append(append([]string{}, side[1:]...), "qdisc", "add", "dev", dev, "root",
			"tbf", "rate", rate, "burst", burst, "latency", "50ms")
		if _, err := proc.CombinedOutput(ctx, side[0], add...); err != nil {
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
	reg, err := registrytest.LaunchDistribution(ctx, registrytest.DistributionOptions{
		Dir: e.dir, Listen: "0.0.0.0:5000", Addr: e.registryAddr,
		Wrapper: []string{"ip", "netns", "exec", e.netns},
	})
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	e.onClose(reg.Stop)

	self, err := os.Executable()
	if err != nil {
		return err
	}
	ctl := filepath.Join(e.dir, "proxy.sock")
	px, err := proc.Start(e.dir, "proxy", exec.Command("ip", "netns", "exec", e.netns, self, "proxy",
		"-listen", e.proxyAddr, "-upstream", "127.0.0.1:5000", "-control", ctl))
	if err != nil {
		return err
	}
	e.onClose(func() error { return px.Stop(10 * time.Second) })
	e.proxy = newProxyClient(ctl)
	if err := proc.WaitReady(ctx, px, 20*time.Second, func() error {
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

// startSnapshotter starts the daemon with its defaults and an empty root
// (every run restarts it with the settings of its mode, see cold).
func (e *env) startSnapshotter(ctx context.Context) error {
	e.snapConfig = daemonConfig(e.proxyAddr, daemonSettings{})
	e.onClose(func() error { return e.stopSnapshotter() })
	return e.restartSnapshotter(ctx)
}

func (e *env) stopSnapshotter() error {
	if e.snap == nil {
		return nil
	}
	err := e.snap.Shutdown()
	e.snap = nil
	if uerr := testenv.UnmountUnder(e.snapRoot); uerr != nil {
		return errors.Join(err, uerr)
	}
	return errors.Join(err, os.RemoveAll(e.snapRoot))
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
	sn, err := testenv.LaunchSnapshotter(ctx, e.dir, testenv.SnapshotterConfig{
		Binary: e.snapshotterBin, Config: e.snapConfig, Root: e.snapRoot, LogLevel: "info", Metrics: true,
	})
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	e.snap = sn
	if err := proc.WaitReady(ctx, sn.Process, 30*time.Second, func() error { return httpOK(ctx, sn.MetricsURL) }); err != nil {
		return fmt.Errorf("snapshotter metrics: %w", err)
	}
	if e.containerd != nil {
		// containerd reconnects to the proxy plugin on its own; wait until
		// it does, so the first measured call does not pay for it. A probe
		// snapshot is prepared and removed: listing snapshots would be
		// answered from containerd's own metadata, without the daemon.
		probe := fmt.Sprintf("bench-probe-%d", e.snapStarts)
		sn := e.client.SnapshotService(snapshotterName)
		nsctx := namespaces.WithNamespace(ctx, ctrNamespace)
		err := proc.WaitReady(ctx, e.containerd.Process, 60*time.Second, func() error {
			if _, err := sn.Prepare(nsctx, probe, ""); err != nil {
				return err
			}
			return sn.Remove(nsctx, probe)
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
	cd, err := testenv.LaunchContainerd16(ctx, e.dir, testenv.ContainerdConfig{
		Snapshotters: map[string]string{snapshotterName: e.snap.Socket},
		Namespace:    ctrNamespace,
		LogLevel:     "info",
	})
	if err != nil {
		return err
	}
	e.containerd = cd
	// Cleanups run last-in first-out: images go before containerd does.
	e.onClose(cd.Close)
	if e.client, err = containerd.New(cd.Socket, containerd.WithDefaultNamespace(ctrNamespace)); err != nil {
		return fmt.Errorf("containerd client: %w", err)
	}
	e.onClose(e.client.Close)
	e.onClose(func() error {
		if cd.Exited() {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		return e.removeAll(ctx)
	})
	return nil
}

// removeAll kills and deletes every task and container and deletes every
// image, the last synchronously (as ctr images rm --sync does: garbage
// collection then removes their content and snapshots).
func (e *env) removeAll(ctx context.Context) error {
	ctx = namespaces.WithNamespace(ctx, ctrNamespace)
	var errs []error
	cs, err := e.client.Containers(ctx)
	if err != nil {
		errs = append(errs, fmt.Errorf("list containers: %w", err))
	}
	for _, c := range cs {
		if t, err := c.Task(ctx, nil); err == nil {
			if _, err := t.Delete(ctx, containerd.WithProcessKill); err != nil {
				errs = append(errs, fmt.Errorf("delete task %s: %w", c.ID(), err))
			}
		}
		if err := c.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
			errs = append(errs, fmt.Errorf("delete container %s: %w", c.ID(), err))
		}
	}
	is := e.client.ImageService()
	imgs, err := is.List(ctx)
	if err != nil {
		errs = append(errs, fmt.Errorf("list images: %w", err))
	}
	for i, img := range imgs {
		var opts []images.DeleteOpt
		if i == len(imgs)-1 {
			opts = append(opts, images.SynchronousDelete())
		}
		if err := is.Delete(ctx, img.Name, opts...); err != nil {
			errs = append(errs, fmt.Errorf("delete image %s: %w", img.Name, err))
		}
	}
	return errors.Join(errs...)
}

// leftovers lists content and snapshots still in containerd after
// removeAll; a cold run needs none.
func (e *env) leftovers(ctx context.Context) (string, error) {
	ctx = namespaces.WithNamespace(ctx, ctrNamespace)
	var b strings.Builder
	blobs := 0
	if err := e.client.ContentStore().Walk(ctx, func(content.Info) error { blobs++; return nil }); err != nil {
		return "", fmt.Errorf("list content: %w", err)
	}
	if blobs > 0 {
		fmt.Fprintf(&b, "%d content blobs; ", blobs)
	}
	for _, sn := range []string{"overlayfs", snapshotterName} {
		n := 0
		if err := e.client.SnapshotService(sn).Walk(ctx, func(context.Context, snapshots.Info) error { n++; return nil }); err != nil {
			return "", fmt.Errorf("list %s snapshots: %w", sn, err)
		}
		if n > 0 {
			fmt.Fprintf(&b, "%d %s snapshots; ", n, sn)
		}
	}
	return b.String(), nil
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

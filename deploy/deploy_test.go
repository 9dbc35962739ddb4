// Package deploy_test checks the deployment material: the Helm chart lints
// and renders, the rendered manifests decode strictly into the Kubernetes
// API types (unknown or mistyped fields fail, as the API server's schema
// would reject them) and carry what the daemon needs on a node, the
// checked-in manifest is the chart's rendering, and the systemd unit keeps
// the fd-holder alive across restarts.
package deploy_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

const chart = "helm/spanpull"

// helm runs the helm CLI (scripts/install-deps.sh installs it).
func helm(t *testing.T, args ...string) []byte {
	t.Helper()
	bin, err := exec.LookPath("helm")
	if err != nil {
		gopath, gerr := exec.Command("go", "env", "GOPATH").Output()
		bin = filepath.Join(strings.TrimSpace(string(gopath)), "bin", "helm")
		if _, serr := os.Stat(bin); gerr != nil || serr != nil {
			t.Fatal("helm not installed: run scripts/install-deps.sh")
		}
	}
	var stderr bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helm %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return out
}

func TestHelmLint(t *testing.T) {
	helm(t, "lint", "--strict", chart)
}

// render renders the chart with extra helm template arguments and decodes
// every document strictly into its API type.
func render(t *testing.T, args ...string) (*corev1.ConfigMap, *appsv1.DaemonSet) {
	t.Helper()
	out := helm(t, append([]string{"template", "spanpull", chart, "--namespace", "spanpull-system"}, args...)...)
	return decode(t, out)
}

// decode strictly decodes a multi-document manifest of one ConfigMap, the
// daemon's DaemonSet and the fd holder's DaemonSet (nil when disabled).
func decode(t *testing.T, manifest []byte) (*corev1.ConfigMap, *appsv1.DaemonSet) {
	cm, ds, _ := decodeAll(t, manifest)
	return cm, ds
}

func decodeAll(t *testing.T, manifest []byte) (cm *corev1.ConfigMap, ds, holder *appsv1.DaemonSet) {
	t.Helper()
	for _, doc := range strings.Split(string(manifest), "\n---") {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		var meta struct{ APIVersion, Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatalf("manifest document: %v\n%s", err, doc)
		}
		var obj any
		switch meta.APIVersion + " " + meta.Kind {
		case "v1 ConfigMap":
			cm = &corev1.ConfigMap{}
			obj = cm
		case "apps/v1 DaemonSet":
			d := &appsv1.DaemonSet{}
			obj = d
			if strings.Contains(doc, "app.kubernetes.io/component: fd-holder") {
				holder = d
			} else {
				ds = d
			}
		default:
			t.Fatalf("unexpected object %s %s", meta.APIVersion, meta.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			t.Fatalf("%s does not match the API schema: %v", meta.Kind, err)
		}
	}
	if cm == nil || ds == nil {
		t.Fatalf("manifest lacks the ConfigMap or the DaemonSet:\n%s", manifest)
	}
	return cm, ds, holder
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// TestDaemonSet: what a node needs from the daemon's pod.
func TestDaemonSet(t *testing.T) {
	cm, ds := render(t)
	if _, ok := cm.Data["config.toml"]; !ok {
		t.Fatal("ConfigMap has no config.toml")
	}
	spec := ds.Spec.Template.Spec
	if spec.HostPID || !spec.HostNetwork {
		t.Error("the pod needs hostNetwork (probes on the node) and not hostPID (the fd holder is a DaemonSet of its own)")
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Error("the container must be privileged (mount, FUSE)")
	}
	probe := func(p *corev1.Probe, path string) {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != path || p.HTTPGet.Port.String() != "metrics" {
			t.Errorf("probe %s: %+v", path, p)
		}
	}
	probe(c.ReadinessProbe, "/readyz")
	probe(c.LivenessProbe, "/healthz")
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
		if _, ok := volumes[m.Name]; !ok {
			t.Errorf("mount %s names no volume %q", m.MountPath, m.Name)
		}
	}
	hostPath := func(mountPath, host string) corev1.VolumeMount {
		m, ok := mounts[mountPath]
		if !ok {
			t.Errorf("no mount at %s", mountPath)
			return m
		}
		if hp := volumes[m.Name].HostPath; hp == nil || hp.Path != host {
			t.Errorf("%s is not the host's %s: %+v", mountPath, host, volumes[m.Name])
		}
		return m
	}
	if m := hostPath("/var/lib/spanpull", "/var/lib/spanpull"); m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
		t.Error("the root must propagate mounts to the host (Bidirectional)")
	}
	hostPath("/run/spanpull", "/run/spanpull")
	hostPath("/dev/fuse", "/dev/fuse")
	hostPath("/etc/containerd", "/etc/containerd")
	hostPath("/run/containerd", "/run/containerd")
	if m := mounts["/etc/spanpull"]; volumes[m.Name].ConfigMap == nil || volumes[m.Name].ConfigMap.Name != cm.Name {
		t.Error("/etc/spanpull is not the chart's ConfigMap")
	}

	// Values reach the manifest.
	_, ds = render(t, "--set", "image.tag=v9", "--set", "resources.limits.memory=3Gi", "--set-json", `tolerations=[{"key":"gpu","operator":"Exists"}]`)
	c = ds.Spec.Template.Spec.Containers[0]
	if !strings.HasSuffix(c.Image, ":v9") || c.Resources.Limits.Memory().String() != "3Gi" ||
		len(ds.Spec.Template.Spec.Tolerations) != 1 || ds.Spec.Template.Spec.Tolerations[0].Key != "gpu" {
		t.Fatalf("values not applied: image %s, limits %v, tolerations %v", c.Image, c.Resources.Limits, ds.Spec.Template.Spec.Tolerations)
	}
}

// TestFDHolderDaemonSet: the fd holder outlives rollouts of the daemon (a
// DaemonSet of its own, replaced only when its pods are deleted), shares
// the daemon's socket directory, and the daemon's config waits for it
// instead of starting one in its own pod.
func TestFDHolderDaemonSet(t *testing.T) {
	cm, ds, holder := decodeAll(t, helm(t, "template", "spanpull", chart, "--namespace", "spanpull-system"))
	if holder == nil {
		t.Fatal("no fd-holder DaemonSet")
	}
	if holder.Spec.UpdateStrategy.Type != appsv1.OnDeleteDaemonSetStrategyType {
		t.Errorf("fd holder update strategy %q, want OnDelete", holder.Spec.UpdateStrategy.Type)
	}
	c := holder.Spec.Template.Spec.Containers[0]
	if strings.Join(c.Command, " ") != "snapshotter fd-holder --socket /run/spanpull/fd-holder.sock --grace 5m" {
		t.Errorf("fd holder command %q", c.Command)
	}
	if len(c.VolumeMounts) != 1 || c.VolumeMounts[0].MountPath != "/run/spanpull" {
		t.Errorf("fd holder mounts %+v, want the run directory", c.VolumeMounts)
	}
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType {
		t.Errorf("daemon update strategy %q", ds.Spec.UpdateStrategy.Type)
	}
	conf := cm.Data["config.toml"]
	if !strings.Contains(conf, `fd_holder_socket = "/run/spanpull/fd-holder.sock"`) || !strings.Contains(conf, "start_fd_holder = false") {
		t.Errorf("the daemon's config does not use the holder DaemonSet:\n%s", conf)
	}
	if _, _, h := decodeAll(t, helm(t, "template", "spanpull", chart, "--set", "fdHolder.enabled=false")); h != nil {
		t.Error("fdHolder.enabled=false still renders the holder")
	}
}

// TestCheckedInManifest: deploy/kubernetes/spanpull.yaml is the chart's
// rendering with default values.
func TestCheckedInManifest(t *testing.T) {
	want := helm(t, "template", "spanpull", chart, "--namespace", "spanpull-system")
	got, err := os.ReadFile("kubernetes/spanpull.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(got, want) {
		t.Fatal("kubernetes/spanpull.yaml is not the chart's rendering: regenerate it with the command in its header")
	}
	decode(t, got)
}

func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile("systemd/spanpull-snapshotter.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, want := range []string{"\nKillMode=process\n", "\nExecStart=/usr/local/bin/snapshotter serve --config /etc/spanpull/config.toml\n", "\nBefore=containerd.service\n"} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q", strings.TrimSpace(want))
		}
	}
}

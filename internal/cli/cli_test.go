package cli

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

func TestRun(t *testing.T) {
	ok := &cobra.Command{Use: "ok", RunE: func(*cobra.Command, []string) error { return nil }}
	var stderr bytes.Buffer
	if got := run("tool", ok, &stderr); got != 0 || stderr.Len() != 0 {
		t.Errorf("run ok = %d, stderr %q", got, stderr.String())
	}
	fail := &cobra.Command{Use: "fail", SilenceErrors: true, SilenceUsage: true,
		RunE: func(*cobra.Command, []string) error { return errors.New("boom") }}
	if got := run("tool", fail, &stderr); got != 1 || stderr.String() != "tool: boom\n" {
		t.Errorf("run fail = %d, stderr %q", got, stderr.String())
	}
}

func TestGroup(t *testing.T) {
	leaf := &cobra.Command{Use: "leaf", RunE: func(*cobra.Command, []string) error { return nil }}
	root := &cobra.Command{Use: "tool", SilenceErrors: true, SilenceUsage: true}
	root.AddCommand(Group(&cobra.Command{Use: "grp", Short: "a group"}, leaf))
	var out bytes.Buffer
	root.SetOut(&out)
	for _, tc := range []struct {
		args    []string
		wantErr string
		wantOut string
	}{
		{args: []string{"grp"}, wantOut: "leaf"},
		{args: []string{"grp", "leaf"}},
		{args: []string{"grp", "nope"}, wantErr: `unknown command "nope" for "tool grp" (see tool grp --help)`},
	} {
		out.Reset()
		root.SetArgs(tc.args)
		err := root.Execute()
		if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || err.Error() != tc.wantErr) {
			t.Errorf("%v: err %v, want %q", tc.args, err, tc.wantErr)
		}
		if !strings.Contains(out.String(), tc.wantOut) {
			t.Errorf("%v: output %q lacks %q", tc.args, out.String(), tc.wantOut)
		}
	}
}

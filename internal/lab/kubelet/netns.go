package kubelet

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// createNetNS makes a pod's network namespace with iproute2, which pins it
// under /run/netns: the node's private /run, so it is visible only in this
// node's mount namespace.
func createNetNS(name string) error {
	return ip("netns", "add", name)
}

func deleteNetNS(name string) error {
	if _, err := os.Stat("/run/netns/" + name); os.IsNotExist(err) {
		return nil
	}
	return ip("netns", "delete", name)
}

func ip(args ...string) error {
	var out bytes.Buffer
	cmd := exec.Command("ip", args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}

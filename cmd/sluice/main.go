package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/sluice-net/sluice/cni"
)

const about = "sluice CNI plugin: veth, host-local IPAM on the node's subnet, and the hand-off to sluiced"

func main() {
	if os.Getenv("CNI_COMMAND") != "" || len(os.Args) < 2 {
		skel.PluginMainFuncs(cni.Funcs(), cni.SupportedVersions, about)
		return
	}
	var err error
	switch os.Args[1] {
	case "install":
		err = install(os.Args[2:])
	case "uninstall":
		err = uninstall(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q; use install or uninstall (the runtime calls the plugin with CNI_COMMAND set)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sluice:", err)
		os.Exit(1)
	}
}

func install(args []string) error {
	fs := flag.NewFlagSet("install", flag.ContinueOnError)
	self, _ := os.Executable()
	o := cni.InstallOptions{}
	fs.StringVar(&o.SrcBinDir, "src-bin-dir", filepath.Dir(self), "directory holding sluice and the reference plugins to copy")
	fs.StringVar(&o.BinDir, "cni-bin-dir", "/host/opt/cni/bin", "the host's CNI bin dir")
	fs.StringVar(&o.ConfDir, "cni-conf-dir", "/host/etc/cni/net.d", "the host's CNI conf dir")
	conflist := fs.String("conflist", "", "conflist template file (default: sluice, portmap, bandwidth)")
	fs.StringVar(&o.TokenFile, "token-file", "/var/run/secrets/kubernetes.io/serviceaccount/token", "ServiceAccount token for the kubeconfig")
	fs.StringVar(&o.CAFile, "ca-file", "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt", "cluster CA for the kubeconfig")
	server := ""
	if h, p := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"); h != "" && p != "" {
		server = "https://" + net.JoinHostPort(h, p)
	}
	fs.StringVar(&o.Server, "server", server, "API server URL for the kubeconfig")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *conflist != "" {
		b, err := os.ReadFile(*conflist)
		if err != nil {
			return fmt.Errorf("reading --conflist: %w", err)
		}
		o.Conflist = string(b)
	}
	written, err := cni.Install(o)
	for _, f := range written {
		fmt.Println("installed", f)
	}
	return err
}

func uninstall(args []string) error {
	fs := flag.NewFlagSet("uninstall", flag.ContinueOnError)
	binDir := fs.String("cni-bin-dir", "/host/opt/cni/bin", "the host's CNI bin dir")
	confDir := fs.String("cni-conf-dir", "/host/etc/cni/net.d", "the host's CNI conf dir")
	stateDir := fs.String("cni-state-dir", "/host/var/lib/cni", "the host's CNI state dir (/var/lib/cni), where the plugin and host-local keep their records; empty keeps them")
	if err := fs.Parse(args); err != nil {
		return err
	}
	// The conflist names the network whose reservations host-local keeps;
	// read it before it is removed.
	network := cni.InstalledNetwork(*confDir)
	removed, err := cni.Uninstall(*binDir, *confDir)
	if *stateDir != "" {
		more, serr := cni.RemoveState(*stateDir, network)
		removed, err = append(removed, more...), errors.Join(err, serr)
	}
	for _, f := range removed {
		fmt.Println("removed", f)
	}
	return err
}

package cni

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/sluice-net/sluice/cni/endpointapi"
)

// SupportedVersions are the CNI spec versions the plugin speaks.
var SupportedVersions = version.PluginSupports("0.3.1", "0.4.0", "1.0.0", "1.1.0")

// Funcs are the plugin's verbs for skel, each reporting its outcome to the
// agent.
func Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{
		Add:    reported(endpointapi.VerbAdd, cmdAdd),
		Del:    reported(endpointapi.VerbDel, cmdDel),
		Check:  reported(endpointapi.VerbCheck, cmdCheck),
		GC:     reported(endpointapi.VerbGC, cmdGC),
		Status: reported(endpointapi.VerbStatus, cmdStatus),
	}
}

// k8sArgs are the CNI_ARGS containerd and CRI-O pass.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // CNI_ARGS names
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
}

func parseArgs(args string) (*k8sArgs, error) {
	a := &k8sArgs{}
	if err := types.LoadArgs(args, a); err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "sluice: CNI_ARGS are malformed", err.Error())
	}
	return a, nil
}

func tryAgain(msg string, err error) error {
	return types.NewError(types.ErrTryAgainLater, msg, err.Error())
}

// cmdAdd wires the pod. Every step registers its undo, so a failed ADD
// releases its IP and removes its veth: err is the named result the
// deferred rollback reads.
func cmdAdd(args *skel.CmdArgs) (err error) {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	plan, err := planPod(conf, args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout)
	defer cancel()
	agent := endpointapi.NewClient(conf.AgentSocket)
	// An agent that is down costs no IP: the socket must at least exist.
	// (A round trip to ask would add to every ADD; the registration at the
	// end is the real test, and its failure rolls everything back.)
	if _, err := os.Stat(conf.AgentSocket); err != nil {
		return tryAgain("sluice: the node agent sluiced is not running (no "+conf.AgentSocket+"); the runtime will retry", err)
	}
	netns, err := ns.GetNS(args.Netns)
	if err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("sluice: opening netns %q", args.Netns), err.Error())
	}
	defer netns.Close()

	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()
	ipamRes, err := invoke.DelegateAdd(ctx, plan.ipamType, plan.ipamConf, nil)
	if err != nil {
		return types.NewError(types.ErrInternal, "sluice: IPAM plugin "+plan.ipamType+" failed to allocate", err.Error())
	}
	undo = append(undo, func() { _ = invoke.DelegateDel(context.Background(), plan.ipamType, plan.ipamConf, nil) })
	// DEL must release this allocation even if subnet.env is gone by then.
	if err := saveIPAMConf(conf.DataDir, args.ContainerID, args.IfName, plan.ipamType, plan.ipamConf); err != nil {
		return types.NewError(types.ErrIOFailure, "sluice: saving the IPAM configuration", err.Error())
	}
	undo = append(undo, func() { removeIPAMConf(conf.DataDir, args.ContainerID, args.IfName) })
	res, err := current.NewResultFromResult(ipamRes)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "sluice: reading the IPAM result", err.Error())
	}
	if len(res.IPs) == 0 {
		return types.NewError(types.ErrInternal, "sluice: IPAM plugin "+plan.ipamType+" returned no IP", "")
	}
	hostVeth := plan.hostVeth
	hostIface, contIface, err := wire(netns, args.ContainerID, args.IfName, hostVeth, plan.mtu, res)
	undo = append(undo, func() { _ = unwire(args.Netns, args.ContainerID, args.IfName, hostVeth) })
	if err != nil {
		return types.NewError(types.ErrInternal, "sluice: wiring the pod", err.Error())
	}
	res.Interfaces = []*current.Interface{hostIface, contIface}
	var ips []string
	for _, ipc := range res.IPs {
		ipc.Interface = current.Int(1)
		ipc.Address = net.IPNet{IP: ipc.Address.IP, Mask: hostPrefix(ipc.Address.IP).Mask}
		if ipc.Address.IP.To4() != nil {
			ipc.Gateway = gatewayV4
		} else {
			ipc.Gateway = gatewayV6
		}
		ips = append(ips, ipc.Address.IP.String())
	}
	res.Routes = defaultRoutes(res)
	res.DNS = conf.DNS

	ep := endpointapi.Endpoint{
		ContainerID: args.ContainerID, Namespace: string(plan.k8s.K8S_POD_NAMESPACE), Pod: string(plan.k8s.K8S_POD_NAME),
		PodUID: string(plan.k8s.K8S_POD_UID), IfName: args.IfName, HostVeth: hostVeth, IPs: ips, NetNS: args.Netns,
	}
	if err := agent.Register(ctx, ep); err != nil {
		if errors.Is(err, endpointapi.ErrUnreachable) || errors.Is(err, context.DeadlineExceeded) {
			return tryAgain(fmt.Sprintf("sluice: sluiced did not program the pod's endpoint within %s; the runtime will retry", conf.timeout), err)
		}
		return types.NewError(types.ErrInternal, "sluice: sluiced refused the pod's endpoint", err.Error())
	}
	return types.PrintResult(res, conf.CNIVersion)
}

// podPlan is what ADD and CHECK derive from a call before they touch
// anything: the pod's identity and host veth name, the delegated IPAM
// plugin and its config, and the MTU.
type podPlan struct {
	k8s      *k8sArgs
	hostVeth string
	ipamType string
	ipamConf []byte
	mtu      int
}

func planPod(conf *NetConf, args *skel.CmdArgs) (*podPlan, error) {
	k8s, err := parseArgs(args.Args)
	if err != nil {
		return nil, err
	}
	subnets, ipamType, ipamConf, err := conf.delegation()
	if err != nil {
		return nil, err
	}
	return &podPlan{
		k8s:      k8s,
		hostVeth: HostVethName(string(k8s.K8S_POD_NAMESPACE), string(k8s.K8S_POD_NAME), args.ContainerID),
		ipamType: ipamType, ipamConf: ipamConf, mtu: conf.mtu(subnets),
	}, nil
}

// delegation reads the node's subnets and builds the IPAM plugin's type and
// configuration from them.
func (c *NetConf) delegation() (*Subnets, string, []byte, error) {
	subnets, err := ReadSubnets(c.SubnetFile)
	if err != nil {
		return nil, "", nil, err
	}
	typ, conf, err := c.ipamConf(subnets)
	if err != nil {
		return nil, "", nil, err
	}
	return subnets, typ, conf, nil
}

// mtu is the configured MTU, or the overlay's.
func (c *NetConf) mtu(s *Subnets) int {
	if c.MTU != 0 {
		return c.MTU
	}
	return s.MTU
}

// resultOf converts a prevResult to the current version and checks what
// CHECK relies on.
func resultOf(r types.Result) (*current.Result, error) {
	res, err := current.NewResultFromResult(r)
	if err != nil {
		return nil, err
	}
	if len(res.IPs) == 0 {
		return nil, errors.New("prevResult lists no IP")
	}
	for _, ipc := range res.IPs {
		if ipc == nil || ipc.Address.IP == nil {
			return nil, errors.New("prevResult has an IP entry without an address")
		}
	}
	return res, nil
}

func defaultRoutes(res *current.Result) []*types.Route {
	var routes []*types.Route
	for _, ipc := range res.IPs {
		if ipc.Address.IP.To4() != nil {
			routes = append(routes, &types.Route{Dst: net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}, GW: gatewayV4})
		} else {
			routes = append(routes, &types.Route{Dst: net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}, GW: gatewayV6})
		}
	}
	return routes
}

// cmdDel always releases: the IP, the veth and the endpoint, whatever is
// left of them, also after a half-failed ADD, without the netns, or with the
// agent down (it forgets endpoints whose veth is gone on its own).
func cmdDel(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	k8s, err := parseArgs(args.Args)
	if err != nil {
		return err
	}
	var errs []string
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout)
	defer cancel()
	if err := endpointapi.NewClient(conf.AgentSocket).Unregister(ctx, args.ContainerID, args.IfName); err != nil {
		fmt.Fprintf(os.Stderr, "sluice: unregistering %s: %v (continuing)\n", args.ContainerID, err)
	}
	hostVeth := HostVethName(string(k8s.K8S_POD_NAMESPACE), string(k8s.K8S_POD_NAME), args.ContainerID)
	if err := unwire(args.Netns, args.ContainerID, args.IfName, hostVeth); err != nil {
		errs = append(errs, err.Error())
	}
	ipamType, ipamConf, ok := loadIPAMConf(conf.DataDir, args.ContainerID, args.IfName)
	if !ok {
		// No ADD got as far as IPAM for this container, or its record is
		// lost: release with the current subnets, if there are any.
		if subnets, serr := ReadSubnets(conf.SubnetFile); serr == nil {
			if ipamType, ipamConf, err = conf.ipamConf(subnets); err != nil {
				return err
			}
			ok = true
		}
	}
	if ok {
		if err := invoke.DelegateDel(ctx, ipamType, ipamConf, nil); err != nil {
			errs = append(errs, fmt.Sprintf("IPAM %s: %v", ipamType, err))
		} else {
			removeIPAMConf(conf.DataDir, args.ContainerID, args.IfName)
		}
	}
	if len(errs) > 0 {
		return types.NewError(types.ErrInternal, "sluice: DEL could not release everything", strings.Join(errs, "; "))
	}
	return nil
}

func cmdCheck(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	if err := version.ParsePrevResult(&conf.NetConf); err != nil {
		return types.NewError(types.ErrDecodingFailure, "sluice: reading prevResult", err.Error())
	}
	if conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "sluice: CHECK needs a prevResult", "")
	}
	res, err := resultOf(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "sluice: reading prevResult", err.Error())
	}
	plan, err := planPod(conf, args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout)
	defer cancel()
	if err := invoke.DelegateCheck(ctx, plan.ipamType, plan.ipamConf, nil); err != nil {
		return types.NewError(types.ErrInternal, "sluice: IPAM check failed", err.Error())
	}
	netns, err := ns.GetNS(args.Netns)
	if err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("sluice: opening netns %q", args.Netns), err.Error())
	}
	defer netns.Close()
	if err := check(netns, args.ContainerID, args.IfName, plan.hostVeth, plan.mtu, res); err != nil {
		return types.NewError(types.ErrInternal, "sluice: the pod's network drifted: "+err.Error(), "")
	}
	return nil
}

// cmdGC releases every allocation the runtime no longer lists, by handing
// the valid attachments to the IPAM plugin.
func cmdGC(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	_, ipamType, ipamConf, err := conf.delegation()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout)
	defer cancel()
	if err := invoke.DelegateGC(ctx, ipamType, ipamConf, nil); err != nil {
		return types.NewError(types.ErrInternal, "sluice: IPAM garbage collection failed", err.Error())
	}
	return nil
}

// cmdStatus says whether the plugin can take ADDs: the overlay has
// published the node's subnets and the agent answers.
func cmdStatus(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	if _, err := ReadSubnets(conf.SubnetFile); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "sluice: the node's overlay is not ready", err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := endpointapi.NewClient(conf.AgentSocket).Ping(ctx); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "sluice: sluiced is not reachable at "+conf.AgentSocket, err.Error())
	}
	return nil
}

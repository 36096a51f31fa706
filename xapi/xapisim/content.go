package xapisim

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"time"
)

// PoolName returns the name of pool i: site-a, site-b, ...
func PoolName(i int) string {
	if i < 26 {
		return "site-" + string(rune('a'+i))
	}
	return fmt.Sprintf("site-%d", i)
}

// Network names every pool has.
const (
	ManagementNetwork = "Pool-wide network associated with eth0"
	WANNetwork        = "WAN-net"
	DemoVMName        = "demo-vm"
)

// buildDefault creates the default pools: site-a with a running demo-vm,
// the others with an empty SR.
func (s *Sim) buildDefault() error {
	for i := 0; i < s.cfg.Pools; i++ {
		p := newPool(s, PoolName(i))
		s.pools = append(s.pools, p)
		if err := p.populate(i == 0 && !s.cfg.NoDemoVM); err != nil {
			return err
		}
	}
	return nil
}

func (p *Pool) populate(demo bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	d := p.db
	cfg := p.sim.cfg
	pool := d.create("pool", map[string]any{"name_label": p.Name, "migration_compression": false})
	// The management network serves NBD with TLS (purpose "nbd"), so
	// VDI.get_nbd_info answers out of the box.
	mgmt := d.create("network", map[string]any{"name_label": ManagementNetwork, "bridge": "xenbr0",
		"name_description": "management network", "purpose": []string{PurposeNBD}})
	wan := d.create("network", map[string]any{"name_label": WANNetwork, "bridge": "xenbr1",
		"name_description": "network shared by name with the other sites"})
	sr := d.create("SR", map[string]any{"name_label": p.Name + " storage", "type": "ext", "content_type": "user",
		"shared": true, "physical_size": int64(1) << 40, "name_description": "simulated ext SR (sparse files)"})
	if err := os.MkdirAll(p.sim.srDir(sr.str("uuid")), 0o755); err != nil {
		return fmt.Errorf("create SR dir: %w", err)
	}
	d.set(pool, "default_SR", sr.Ref)
	d.set(pool, "suspend_image_SR", sr.Ref)
	d.set(pool, "crash_dump_SR", sr.Ref)
	var master string
	for h := 0; h < cfg.HostsPerPool; h++ {
		name := fmt.Sprintf("%s-host%d", p.Name, h+1)
		host := d.create("host", map[string]any{
			"name_label": name, "hostname": name, "address": "127.0.0.1",
			"API_version_vendor_implementation": map[string]string{},
			"software_version": map[string]string{"product_brand": "XCP-ng", "product_version": "8.3.0",
				"xapi": "26.1", "platform_name": "XCP", "wanmotion_simulator": "true"},
			"cpu_info":     map[string]string{"cpu_count": "4", "vendor": "GenuineIntel"},
			"sched_policy": "credit", "memory_overhead": int64(0),
		})
		if h == 0 {
			master = host.Ref
		}
		dom0 := d.create("VM", map[string]any{
			"name_label": "Control domain on host: " + name, "is_control_domain": true,
			"power_state": Running, "resident_on": host.Ref, "domid": int64(0),
			"memory_static_max": int64(4) << 30, "memory_dynamic_max": int64(4) << 30,
			"memory_dynamic_min": int64(4) << 30, "memory_static_min": int64(4) << 30,
			"memory_target": int64(4) << 30, "VCPUs_max": int64(4), "VCPUs_at_startup": int64(4),
			"start_time": time.Now().UTC().Truncate(time.Second),
		})
		d.set(host, "control_domain", dom0.Ref)
		for i, n := range []*object{mgmt, wan} {
			d.create("PIF", map[string]any{
				"device": fmt.Sprintf("eth%d", i), "network": n.Ref, "host": host.Ref, "MAC": randomMAC(),
				"MTU": int64(1500), "IP": "127.0.0.1", "netmask": "255.0.0.0", "management": i == 0,
			})
		}
		d.create("PBD", map[string]any{"host": host.Ref, "SR": sr.Ref, "currently_attached": true,
			"device_config": map[string]string{"location": p.sim.srDir(sr.str("uuid"))}})
	}
	d.set(pool, "master", master)
	if demo {
		return p.createDemoVM(sr, wan, master)
	}
	return nil
}

func (p *Pool) createDemoVM(sr, network *object, host string) error {
	d := p.db
	cfg := p.sim.cfg
	mem := cfg.MemorySize
	vm := d.create("VM", map[string]any{
		"name_label": DemoVMName, "name_description": "simulated guest with a realistic disk",
		"memory_static_max": mem, "memory_dynamic_max": mem, "memory_dynamic_min": mem,
		"memory_static_min": mem, "memory_target": mem, "VCPUs_max": int64(2), "VCPUs_at_startup": int64(2),
		"HVM_boot_policy": "BIOS order", "platform": map[string]string{"device-model": "qemu-upstream-compat"},
		"domarch": "x86_64",
	})
	gm := d.createGuestMetrics(demoGuestNetworks(cfg.DemoIPv4, cfg.DemoIPv6))
	d.set(vm, "guest_metrics", gm.Ref)
	vdiRef, err := p.CreateVDI(sr.Ref, cfg.DiskSize, map[string]any{
		"name_label": DemoVMName + " disk 0", "name_description": "root disk", "type": "user",
	})
	if err != nil {
		return err
	}
	vdi, _ := d.get("VDI", vdiRef)
	if err := fillDisk(p.vdiPath(vdi), cfg.DiskSize, cfg.FillSize, 1); err != nil {
		return err
	}
	vdi.Fields["physical_utilisation"] = physicalUtilisation(p.vdiPath(vdi))
	d.create("VBD", map[string]any{"VM": vm.Ref, "VDI": vdiRef, "userdevice": "0", "bootable": true,
		"mode": "RW", "type": "Disk"})
	d.create("VIF", map[string]any{"VM": vm.Ref, "network": network.Ref, "device": "0", "MAC": randomMAC(),
		"MTU": int64(1500)})
	p.setPowerState(vm, Running, host)
	return nil
}

var words = strings.Fields(`the of and to in is that for it as was with be by on not he this are or
his from at which but have an they you were her she there been one all we their has would when
if so no what up out more time about can said them into only some could new other then do than
file system kernel module config user home var log etc lib usr bin share data cache boot device
network server client request response error warning info debug started stopped service daemon`)

// FillDisk writes deterministic, realistic-looking data into a sparse file
// of size: fill bytes of mixed content (compressible text, random blocks,
// a filesystem-like header) spread over the disk, the rest left as holes.
func fillDisk(path string, size, fill int64, seed uint64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("fill disk: %w", err)
	}
	defer func() { _ = f.Close() }()
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	const chunk = 256 << 10
	// A pool of text to slice compressible chunks from.
	var tb strings.Builder
	for tb.Len() < 2<<20 {
		n := 3 + rng.IntN(12)
		for i := 0; i < n; i++ {
			tb.WriteString(words[rng.IntN(len(words))])
			tb.WriteByte(' ')
		}
		tb.WriteString(fmt.Sprintf("%d\n", rng.IntN(100000)))
	}
	text := []byte(tb.String())
	chunks := size / chunk
	want := fill / chunk
	if chunks == 0 || want == 0 {
		return nil
	}
	buf := make([]byte, chunk)
	var written int64
	for i := int64(0); i < chunks && written < want; i++ {
		// Keep the chance of data so the fill spreads over the disk;
		// the first chunk always holds a header.
		left := chunks - i
		if i != 0 && rng.Int64N(left) >= want-written {
			continue
		}
		switch r := rng.IntN(10); {
		case i == 0:
			clear(buf)
			copy(buf[1024:], "WANMOTION-SIM-FS\x00")
			for j := 2048; j < 64<<10; j += 8 {
				buf[j] = byte(rng.IntN(256))
			}
		case r < 6: // text-like, compressible
			off := rng.IntN(len(text) - chunk)
			copy(buf, text[off:off+chunk])
			for k := 0; k < 32; k++ {
				buf[rng.IntN(chunk)] = byte('a' + rng.IntN(26))
			}
		case r < 9: // random (already-compressed files)
			for j := 0; j < chunk; j += 8 {
				v := rng.Uint64()
				for b := 0; b < 8; b++ {
					buf[j+b] = byte(v >> (8 * b))
				}
			}
		default: // mostly zero with sparse structures (tables, bitmaps)
			clear(buf)
			for k := 0; k < 512; k++ {
				buf[rng.IntN(chunk)] = byte(rng.IntN(256))
			}
		}
		if _, err := f.WriteAt(buf, i*chunk); err != nil {
			return fmt.Errorf("fill disk: %w", err)
		}
		written++
	}
	return nil
}
